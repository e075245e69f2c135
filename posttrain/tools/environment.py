"""Multi-turn environments: what the rollout loop appends after each turn of the policy.

The tool-call format is Hermes's, which Qwen2.5/Qwen3 chat templates also use:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "347*829"}}
    </tool_call>

and each call is answered, in order, by

    <tool_response>
    287663
    </tool_response>

A turn without a call is the final answer. Everything the policy can get wrong (JSON, an unknown
tool, arguments that fail the schema, a call that raises, hangs or prints megabytes) comes back
as an "error: ..." response it can read, never as an exception in the trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.tools.base import Tool, ToolResult, cut_output

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


@dataclass
class Observation:
    text: str
    """Appended to the trajectory as tokens the policy did not write ("" = nothing)."""
    done: bool
    """The episode is over (this turn held no tool call: it is the final answer)."""
    reward: float = 0.0
    """Added to the outcome reward (-call_cost per call)."""
    calls: int = 0
    """Tool calls parsed in this turn."""
    failed_calls: int = 0
    """Of those: malformed, unknown tool, bad arguments, raised, timed out, output cut, or past
    max_calls_per_turn."""
    outputs: list[str] = field(default_factory=list)
    """Each call's response alone: what a chat template's `tool` messages hold when the
    rollout renders observations with the model's template instead of `text`."""


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> str:
        """Start an episode on a task row ({"prompt": text, **other columns}); returns text to
        append before the first turn ("" for none)."""
        ...

    def step(self, turn: str) -> Observation:
        """React to the text the policy just wrote (with its closing CALL_CLOSE when it
        stopped there)."""
        ...


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any = field(default_factory=dict)
    error: str | None = None
    """Why the call could not be read; then `name` is "" and it is not run."""


def parse_tool_calls(turn: str) -> list[ToolCall]:
    """Every <tool_call>...</tool_call> block in `turn`, in order. The body must be a JSON object
    {"name": str, "arguments": object}; "arguments" may be left out when there are none. A
    <tool_call> never closed (generation stopped inside it) is a call that could not be read."""
    calls = []
    start = turn.find(CALL_OPEN)
    while start >= 0:
        body_start = start + len(CALL_OPEN)
        end = turn.find(CALL_CLOSE, body_start)
        if end < 0:
            calls.append(ToolCall("", error=f"{CALL_OPEN} without {CALL_CLOSE}"))
            break
        calls.append(_read_call(turn[body_start:end]))
        start = turn.find(CALL_OPEN, end + len(CALL_CLOSE))
    return calls


def _read_call(body: str) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", error=f"invalid JSON in tool call: {e}")
    except RecursionError:
        return ToolCall("", error="invalid JSON in tool call: nested too deeply")
    if not isinstance(call, dict):
        return ToolCall(
            "", error='a tool call must be a JSON object {"name": ..., "arguments": {...}}'
        )
    unexpected = sorted(set(call) - {"name", "arguments"})
    if unexpected:
        return ToolCall(
            "", error=f"unexpected key {unexpected[0]!r} in tool call; keys: name, arguments"
        )
    if not isinstance(call.get("name"), str):
        return ToolCall("", error='a tool call needs "name": the tool\'s name as a string')
    return ToolCall(call["name"], call.get("arguments", {}))


class ToolEnvironment:
    """Runs the tool calls of each turn and answers them; the episode ends at a turn without one.

    `call_cost` is charged per call parsed (failed ones too), so that the policy learns to call
    only when it pays. Calls of one turn run one after another, each limited to `timeout_s`; at
    most `max_calls_per_turn` are run, the rest are answered with an error. `step` may be called
    from many threads at once on different environments sharing the same tools: the calculator
    runs in the calling thread (bounded work), the other tools in processes, waited on without
    holding the GIL.

    It holds nothing to close: the tools, shared by every environment, own their worker
    processes; `tool.close()` stops them (at exit they are stopped anyway).
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        call_cost: float = 0.0,
        timeout_s: float = 5.0,
        max_output_chars: int = 512,
        max_calls_per_turn: int = 4,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
        if max_output_chars < 64:
            raise ValueError(f"max_output_chars: expected at least 64, got {max_output_chars}")
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn: expected at least 1, got {max_calls_per_turn}")
        self.tools = {tool.name: tool for tool in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"tools: two tools share a name: {[tool.name for tool in tools]}")
        self.call_cost, self.timeout_s = call_cost, timeout_s
        self.max_output_chars, self.max_calls_per_turn = max_output_chars, max_calls_per_turn

    def schemas(self) -> list[dict[str, Any]]:
        """The tools' schemas, for the chat template's `tools=`."""
        return [tool.schema() for tool in self.tools.values()]

    def reset(self, row: dict[str, Any]) -> str:
        return ""

    def step(self, turn: str) -> Observation:
        calls = parse_tool_calls(turn)
        if not calls:
            return Observation("", done=True)
        results = [self._run(call, index) for index, call in enumerate(calls)]
        text = "\n".join(f"{RESPONSE_OPEN}\n{result.text}\n{RESPONSE_CLOSE}" for result in results)
        return Observation(
            text,
            done=False,
            reward=-self.call_cost * len(calls),
            calls=len(calls),
            failed_calls=sum(result.failed for result in results),
            outputs=[result.text for result in results],
        )

    def _run(self, call: ToolCall, index: int) -> ToolResult:
        if index >= self.max_calls_per_turn:
            return self._error(
                f"more than {self.max_calls_per_turn} tool calls in one turn; not run"
            )
        if call.error is not None:
            return self._error(call.error)
        tool = self.tools.get(call.name)
        if tool is None:
            return self._error(f"unknown tool {call.name!r}; tools: {', '.join(self.tools)}")
        return tool(
            call.arguments, timeout_s=self.timeout_s, max_output_chars=self.max_output_chars
        )

    def _error(self, message: str) -> ToolResult:
        return ToolResult(cut_output(f"error: {message}", self.max_output_chars)[0], failed=True)
