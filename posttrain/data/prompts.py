"""Prompts of the online recipes: a task's generated rows or prompt files, tokenized once.

A `Prompt` is a `PromptRecord` (the prompt and the fields its verifiers read: a reference
`answer`, an IFEval `instruction_id_list`...) with the token ids the sampler continues from.
Reward functions get the fields aligned with the completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.config import PromptDataConfig
from posttrain.data.loading import load_records
from posttrain.data.records import DataError, PromptRecord, parse_record
from posttrain.data.tokenize import longest_token_chars, prompt_ids


@dataclass(frozen=True)
class Prompt:
    record: PromptRecord
    token_ids: list[int]
    source: str
    """The file or task it came from (for messages)."""

    @property
    def text(self):
        return self.record.prompt

    @property
    def fields(self) -> dict[str, Any]:
        return self.record.fields


def load_prompts(
    data: PromptDataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat: bool,
    max_prompt_length: int,
    seed: int,
    tools: list[dict] | None = None,
) -> tuple[list[Prompt], list[Prompt]]:
    """`(train, held_out)` prompts from `data.task` or the `data.train` / `data.eval` files,
    tokenized (a chat template gets the schemas of the `tools` the model may call); a prompt
    over `max_prompt_length` tokens is a DataError naming its row."""
    if data.task:
        train, held_out = _task_rows(data, seed)
        sources = (f"task {data.task!r} (train)", f"task {data.task!r} (eval)")
    elif data.train:
        # A prompt with more characters than this cannot fit: refused as its row is read.
        max_chars = max_prompt_length * longest_token_chars(tokenizer)
        try:
            train = _read(data.train, data.train_size, max_chars)
            held_out = _read(data.eval, data.eval_size, max_chars) if data.eval else []
        except DataError as error:
            if "max_chars" not in error.problem:
                raise
            problem = f"{error.problem}: too long for data.max_prompt_length={max_prompt_length}"
            raise DataError(error.source, error.row, error.field, problem) from None
        sources = (data.train, data.eval)
    else:
        raise ValueError("data: set data.task (a task name) or data.train (a prompt file)")
    if not data.eval_size:
        held_out = []
    tokenize = dict(chat=chat, max_length=max_prompt_length, tools=tools)
    return (
        tokenize_prompts(tokenizer, train, source=sources[0], **tokenize),
        tokenize_prompts(tokenizer, held_out, source=sources[1], **tokenize),
    )


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    records: list[PromptRecord],
    *,
    source: str,
    chat: bool,
    max_length: int,
    tools: list[dict] | None = None,
) -> list[Prompt]:
    out = []
    for i, record in enumerate(records):
        ids = prompt_ids(tokenizer, record.prompt, chat, tools)
        if len(ids) > max_length:
            row = record.row if record.row is not None else i + 1
            problem = f"{len(ids)} tokens, over data.max_prompt_length={max_length}"
            raise DataError(source, row, "prompt", problem)
        out.append(Prompt(record, ids, source))
    return out


def _read(path: str, size: int, max_chars: int) -> list[PromptRecord]:
    return load_records(path, "prompt", limit=size or None, max_chars=max_chars)


def _task_rows(data: PromptDataConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    from posttrain.tasks import TASKS

    if data.task not in TASKS:
        raise ValueError(f"data.task: unknown task {data.task!r}; expected one of {sorted(TASKS)}")
    make, source = TASKS[data.task].make, f"task {data.task!r}"

    def records(split: str, size: int) -> list[PromptRecord]:
        rows = make(split, size, seed, **data.task_options) if size else []
        return [
            parse_record(row, "prompt", source=f"{source} ({split})", row_number=i + 1)
            for i, row in enumerate(rows)
        ]

    return records("train", data.train_size), records("eval", data.eval_size)
