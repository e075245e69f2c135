"""A tool the policy can call: its schema for the chat template, and its contained call.

    tool = build_tools(["calculator"])[0]
    tool.schema()                       # {"type": "function", "function": {"name": ...}}
    tool({"expression": "347*829"})     # ToolResult(text="287663", failed=False)

Calling a tool never raises for anything the policy wrote: bad arguments, an exception in the
tool, a timeout and an output past its cap all come back as a `ToolResult` whose text says
what happened, so that the policy can read it and do better next turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema


class ToolError(Exception):
    """A call that failed in a way the policy should be told about; the message is what it reads
    (after "error: ")."""


@dataclass(frozen=True)
class ToolResult:
    text: str
    """What goes between <tool_response> tags: the output, or "error: ..." when the call failed.
    At most the call's `max_output_chars` characters, a cut marker included."""
    failed: bool
    """Bad arguments, raised, timed out, or the output was cut."""


def cut_output(text: str, max_chars: int, total_chars: int | None = None) -> tuple[str, bool]:
    """`text` cut to at most `max_chars` characters, the marker included, and whether it was cut.

    `total_chars` is the length of the full output when `text` is already only its head (a
    worker process sends no more than it must).
    """
    total = len(text) if total_chars is None else total_chars
    if total <= max_chars:
        return text, False
    marker = f"\n... [output cut: {total} chars in all]"
    return text[: max(max_chars - len(marker), 0)] + marker, True


Implementation = Callable[[dict[str, Any], float, int], str | tuple[str, int]]
"""(arguments, timeout_s, max_output_chars) -> the output, or (its first max_output_chars chars,
its full length) when fetching all of it would be waste. Arguments are already validated against
the tool's schema. Raises `ToolError` for a failure the policy should read about."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    run: Implementation = field(repr=False, compare=False)
    _validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        jsonschema.Draft202012Validator.check_schema(self.parameters)
        object.__setattr__(self, "_validator", jsonschema.Draft202012Validator(self.parameters))

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema that chat templates take as `tools=`."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def __call__(
        self, arguments: Any, *, timeout_s: float = 5.0, max_output_chars: int = 512
    ) -> ToolResult:
        """Validate `arguments`, run the tool within `timeout_s`, cut its output. Thread-safe."""
        try:
            if not isinstance(arguments, dict):
                raise ToolError(f"arguments must be a JSON object, got {_json_type(arguments)}")
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
            if error is not None:
                raise ToolError(_argument_error(error))
            output = self.run(arguments, timeout_s, max_output_chars)
            head, total = (output, None) if isinstance(output, str) else output
            text, cut = cut_output(head, max_output_chars, total)
        except ToolError as e:
            return ToolResult(cut_output(f"error: {e}", max_output_chars)[0], failed=True)
        except Exception as e:  # a bug in the tool itself: still an observation, never a crash
            message = f"error: {type(e).__name__}: {e}"
            return ToolResult(cut_output(message, max_output_chars)[0], failed=True)
        return ToolResult(text, failed=cut)

    def close(self) -> None:
        """Stop the tool's worker processes, if it has any (a later call starts new ones)."""
        close = getattr(self.run, "close", None)
        if close is not None:
            close()


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _argument_error(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next(key for key in error.validator_value if key not in error.instance)
        return f"argument '{path + '.' if path else ''}{missing}': required but missing"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        unexpected = sorted(key for key in error.instance if key not in allowed)
        if unexpected:
            known = ", ".join(sorted(allowed)) or "none"
            return f"unexpected argument '{unexpected[0]}'; arguments: {known}"
    return f"argument '{path}': {error.message}" if path else f"arguments: {error.message}"
