"""Tools a policy calls during multi-turn rollouts, and the environment that runs its calls.

    tools = build_tools(["calculator", {"name": "python", "options": {"memory_mb": 256}},
                         {"function": "my_package.search:lookup", "parameters": {...}}])
    env = ToolEnvironment(tools, call_cost=0.01, timeout_s=5.0)
    env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "347*829"}}</tool_call>')
    # Observation(text='<tool_response>\\n287663\\n</tool_response>', done=False, reward=-0.01, ...)

A config item is a built-in tool's name, `{name, options}` for a built-in with options, or a
user tool `{function: "package.module:function", name?, description?, parameters, workers?}`.
Format, containment and measured costs: docs/tools.md.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttrain.sandbox import SandboxUnavailable
from posttrain.tools.base import Tool, ToolError, ToolResult, cut_output
from posttrain.tools.calculator import calculator
from posttrain.tools.environment import (
    CALL_CLOSE,
    CALL_OPEN,
    RESPONSE_CLOSE,
    RESPONSE_OPEN,
    Environment,
    Observation,
    ToolCall,
    ToolEnvironment,
    parse_tool_calls,
)
from posttrain.tools.python import python
from posttrain.tools.user import user_tool

BUILTIN_TOOLS: dict[str, Callable[..., Tool]] = {"calculator": calculator, "python": python}
"""Built-in tools by config name: factory(**options) -> Tool."""
BUILTIN_FIELDS = ("name", "options")
USER_FIELDS = ("function", "name", "description", "parameters", "workers")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What function-calling APIs accept as a tool name."""


def build_tools(specs: Sequence[str | Mapping[str, Any]]) -> list[Tool]:
    """The tools of a config list. Raises ValueError naming the item and field at fault, and
    SandboxUnavailable when the python tool is asked for where the sandbox cannot be built."""
    if isinstance(specs, str | Mapping):
        raise ValueError(f"tools: expected a list of tools, got {type(specs).__name__}")
    tools: list[Tool] = []
    for index, spec in enumerate(specs):
        where = f"tools[{index}]"
        tool = _build_tool(spec, where)
        earlier = next((i for i, t in enumerate(tools) if t.name == tool.name), None)
        if earlier is not None:
            raise ValueError(f"{where}.name: {tool.name!r} is already the name of tools[{earlier}]")
        tools.append(tool)
    return tools


def _build_tool(spec: Any, where: str) -> Tool:
    if isinstance(spec, str):
        return _builtin(spec, {}, where)
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}: expected a built-in tool name ({', '.join(BUILTIN_TOOLS)}) or a mapping, "
            f"got {type(spec).__name__} {spec!r}"
        )
    if "function" in spec:
        _check_fields(spec, USER_FIELDS, where, "user tool")
        if "parameters" not in spec:
            raise ValueError(f"{where}.parameters: required: the JSON schema of the arguments")
        if not isinstance(spec["function"], str):
            raise ValueError(
                f"{where}.function: expected 'package.module:function', got {spec['function']!r}"
            )
        if "name" in spec:
            _check_name(spec["name"], where)
        try:
            tool = user_tool(**spec)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
        _check_name(tool.name, where)
        return tool
    _check_fields(spec, BUILTIN_FIELDS, where, "built-in tool (a user tool needs 'function')")
    if "name" not in spec:
        raise ValueError(
            f"{where}.name: required: a built-in tool ({', '.join(BUILTIN_TOOLS)}), or give "
            "'function': 'package.module:function' for your own"
        )
    options = spec.get("options", {})
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}.options: expected a mapping, got {type(options).__name__}")
    return _builtin(spec["name"], dict(options), where)


def _builtin(name: Any, options: dict[str, Any], where: str) -> Tool:
    factory = BUILTIN_TOOLS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(
            f"{where}: unknown tool {name!r}; built-in tools: {', '.join(BUILTIN_TOOLS)}"
            + _did_you_mean(str(name), BUILTIN_TOOLS)
        )
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key in options:
        if not takes_any and key not in parameters:
            raise ValueError(
                f"{where}.options.{key}: unknown option of {name}; options: "
                f"{', '.join(parameters) or 'none'}" + _did_you_mean(key, parameters)
            )
    try:
        return factory(**options)
    except ValueError as e:
        raise ValueError(f"{where}.options.{e}") from None
    except SandboxUnavailable as e:
        raise SandboxUnavailable(f"{where}: {e}") from None


def _check_fields(spec: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in spec:
        if key not in allowed:
            raise ValueError(
                f"{where}: unknown field {key!r} of a {what}; fields: {', '.join(allowed)}"
                + _did_you_mean(str(key), allowed)
            )


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}.name: expected 1 to 64 letters, digits, _ or -, got {name!r}")


def _did_you_mean(word: str, choices: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = [
    "BUILTIN_TOOLS",
    "CALL_CLOSE",
    "CALL_OPEN",
    "RESPONSE_CLOSE",
    "RESPONSE_OPEN",
    "Environment",
    "Observation",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolError",
    "ToolResult",
    "build_tools",
    "cut_output",
    "parse_tool_calls",
]
