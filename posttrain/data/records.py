"""Record types, one per shape of training example, and `parse_record`, which validates a raw row.

Records are the data boundary: code after `parse_record` trusts them. They are frozen (attributes
cannot be reassigned) but not hashable, because they hold lists and dicts; key them by `id`.
Text is kept exactly as written (no stripping); columns a kind does not use go into `fields`
untouched, so a verifier can read e.g. `fields["answer"]`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": str}
Prompt = str | list[Message]  # plain text, or a conversation the chat template renders

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input data: "{source}: row {row}: field '{field}': {problem}".

    `row` is 1-based: the line number for JSONL, the row index + 1 for Parquet, `datasets` and JSON
    arrays. `row` and `field` are None for problems with the file as a whole.
    """

    def __init__(self, source: str, row: int | None, field: str | None, problem: str) -> None:
        self.source, self.row, self.field, self.problem = source, row, field, problem
        where = [source]
        where += [f"row {row}"] if row is not None else []
        where += [f"field '{field}'"] if field is not None else []
        super().__init__(": ".join([*where, problem]))

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        # So the error survives the trip back from worker processes (datasets.map, DataLoader).
        return DataError, (self.source, self.row, self.field, self.problem)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample completions for (online RL, evaluation)."""

    prompt: Prompt
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class CompletionRecord:
    """A prompt and the completion to imitate (SFT)."""

    prompt: Prompt
    completion: str
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class ConversationRecord:
    """A whole conversation ending on an assistant turn (multi-turn SFT)."""

    messages: list[Message]
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred and a dispreferred response (reward model, DPO family)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None  # how much better `chosen` is, for margin losses
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class RankingRecord:
    """A prompt with K >= 2 distinct responses ordered best to worst."""

    prompt: Prompt
    responses: list[str]
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


@dataclass(frozen=True)
class LabeledRecord:
    """A prompt and completion with a thumbs up (True = desirable) or down, as KTO uses."""

    prompt: Prompt
    completion: str
    label: bool
    id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    row: int | None = field(default=None, compare=False)  # where it came from, for error messages


Record = (
    PromptRecord
    | CompletionRecord
    | ConversationRecord
    | PreferenceRecord
    | RankingRecord
    | LabeledRecord
)

KINDS: dict[str, type] = {
    "prompt": PromptRecord,
    "completion": CompletionRecord,
    "conversation": ConversationRecord,
    "preference": PreferenceRecord,
    "ranking": RankingRecord,
    "labeled": LabeledRecord,
}

# The columns each kind must have; `id` (all kinds) and `margin` (preference) are optional.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "completion": ("prompt", "completion"),
    "conversation": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "ranking": ("prompt", "responses"),
    "labeled": ("prompt", "completion", "label"),
}


def record_type(kind: str) -> type:
    """The record class for `kind`; ValueError naming the nearest kind if there is none."""
    if kind not in KINDS:
        near = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown record kind {kind!r}{hint}; expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def parse_record(
    row: dict[str, Any], kind: str, *, source: str, row_number: int, max_chars: int | None = None
) -> Record:
    """Validate one raw row as a `kind` record; DataError names the source, row and field.

    `max_chars`, if given, bounds each text of the row in characters (a list of messages: their
    contents together), so a huge row can be refused before anything tokenizes it."""
    record_type(kind)
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    check = _RowChecker(source, row_number, max_chars)
    if not isinstance(row, dict):
        raise check.error(None, f"expected an object with named fields, got {_type_name(row)}")
    required = REQUIRED_FIELDS[kind]
    for name in required:
        if name not in row:
            raise check.error(
                name,
                f"missing; a {kind} row needs {', '.join(required)} "
                f"(this row has {', '.join(row) or 'no fields'})",
            )
    used = {*required, "id", *(("margin",) if kind == "preference" else ())}
    common: dict[str, Any] = {
        "id": check.id(row.get("id")),
        "fields": {name: value for name, value in row.items() if name not in used},
        "row": row_number,
    }
    if kind == "conversation":
        return ConversationRecord(check.conversation(row["messages"]), **common)
    prompt = check.prompt(row["prompt"])
    if kind == "prompt":
        return PromptRecord(prompt, **common)
    if kind == "completion":
        return CompletionRecord(prompt, check.text("completion", row["completion"]), **common)
    if kind == "labeled":
        completion = check.text("completion", row["completion"])
        return LabeledRecord(prompt, completion, check.label(row["label"]), **common)
    if kind == "ranking":
        return RankingRecord(prompt, check.responses(row["responses"]), **common)
    chosen, rejected = check.text("chosen", row["chosen"]), check.text("rejected", row["rejected"])
    if chosen == rejected:
        raise check.error("rejected", "identical to 'chosen'; a pair needs two different responses")
    return PreferenceRecord(prompt, chosen, rejected, check.margin(row.get("margin")), **common)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class _RowChecker:
    """Reads typed values out of one row; every failure is a DataError naming the row and field."""

    def __init__(self, source: str, row_number: int, max_chars: int | None = None) -> None:
        self.source, self.row_number, self.max_chars = source, row_number, max_chars

    def error(self, name: str | None, problem: str) -> DataError:
        return DataError(self.source, self.row_number, name, problem)

    def text(self, name: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_type_name(value)}")
        if self.max_chars is not None and len(value) > self.max_chars:
            problem = f"{len(value)} characters, more than max_chars={self.max_chars}"
            raise self.error(name, problem)
        if not value.strip():
            raise self.error(name, "empty or whitespace-only text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer can encode.
            raise self.error(
                name,
                f"not valid UTF-8: lone surrogate {value[err.start]!r} at character {err.start}",
            ) from None
        return value

    def messages(self, name: str, value: object) -> list[Message]:
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of messages, got {_type_name(value)}")
        if not value:
            raise self.error(name, "empty list; expected at least one message")
        messages = []
        chars = 0
        for i, message in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(message, dict):
                raise self.error(
                    where, f"expected a {{role, content}} object, got {_type_name(message)}"
                )
            # Columnar formats (Parquet, datasets) fill keys other rows have with null: ignore those.
            extra = [
                key
                for key, v in message.items()
                if key not in ("role", "content") and v is not None
            ]
            if extra:
                raise self.error(
                    f"{where}.{extra[0]}", "unexpected key; a message has only role and content"
                )
            for key in ("role", "content"):
                if key not in message:
                    raise self.error(f"{where}.{key}", "missing; a message needs role and content")
            role = message["role"]
            if role not in ROLES:
                raise self.error(
                    f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"
                )
            content = self.text(f"{where}.content", message["content"])
            chars += len(content)
            if self.max_chars is not None and chars > self.max_chars:
                problem = (
                    f"{name}[0] to {where} are {chars} characters together, more than "
                    f"max_chars={self.max_chars}"
                )
                raise self.error(f"{where}.content", problem)
            messages.append({"role": role, "content": content})
        return messages

    def conversation(self, value: object) -> list[Message]:
        messages = self.messages("messages", value)
        if all(m["role"] != "assistant" for m in messages):
            raise self.error("messages", "no assistant turn; a conversation needs one to train on")
        if messages[-1]["role"] != "assistant":
            raise self.error(
                f"messages[{len(messages) - 1}].role",
                f"the last message is from the {messages[-1]['role']}; a training conversation must "
                "end on an assistant turn",
            )
        return messages

    def prompt(self, value: object) -> Prompt:
        if isinstance(value, str):
            return self.text("prompt", value)
        if not isinstance(value, list):
            raise self.error(
                "prompt", f"expected a string or a list of messages, got {_type_name(value)}"
            )
        messages = self.messages("prompt", value)
        if messages[-1]["role"] == "assistant":
            # The model answers after the prompt, so the prompt cannot already end with an answer.
            raise self.error(
                f"prompt[{len(messages) - 1}].role",
                "the last message of a prompt is from the assistant; put the answer in the "
                "completion (or chosen/rejected/responses) field instead",
            )
        return messages

    def responses(self, value: object) -> list[str]:
        if not isinstance(value, list):
            raise self.error("responses", f"expected a list of strings, got {_type_name(value)}")
        if len(value) < 2:
            raise self.error("responses", f"{len(value)} response(s); a ranking needs at least 2")
        responses = [self.text(f"responses[{i}]", text) for i, text in enumerate(value)]
        first_index: dict[str, int] = {}
        for i, text in enumerate(responses):
            if text in first_index:
                problem = (
                    f"same text as responses[{first_index[text]}]; a ranking needs distinct ones"
                )
                raise self.error(f"responses[{i}]", problem)
            first_index[text] = i
        return responses

    def label(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error("label", f"expected true or false, got {_type_name(value)} {value!r}")
        return value

    def margin(self, value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error("margin", f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise self.error("margin", f"expected a finite number, got {value}")
        return float(value)

    def id(self, value: object) -> str | None:
        if value is None:
            return None
        # bool is an int subclass, but `true` as an id is almost certainly a misplaced column.
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error("id", f"expected a string or an integer, got {_type_name(value)}")
        if isinstance(value, str) and not value.strip():
            raise self.error("id", "empty or whitespace-only id")
        return str(value)
