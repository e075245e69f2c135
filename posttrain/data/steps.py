"""Reasoning steps: splitting a solution into steps, step-labelled records, and the packed
batches a process reward model (PRM) scores at each step's last token.

A solution's steps end at each `separator` (the separator belongs to the step it closes) and
at the end of the text: `"7+8=15, 3+0+1=4, 45"` with separator `", "` is the steps
`["7+8=15, ", "3+0+1=4, ", "45"]`. Each step is tokenized on its own and the steps' tokens are
concatenated, so a step always ends on a token boundary and the PRM reads its verdict on step k
at that step's last token, having seen the prompt and steps 1..k only (Lightman et al. 2023,
Sec. 2.5; Math-Shepherd, Wang et al. 2024, Sec. 3.2 score at a step tag the same way).

A step-label file has one row per solution:

    {"prompt": "37+08=", "steps": ["7+8=15, ", "3+0+1=4, ", "45"], "labels": [1.0, 0.75, 1.0]}

`labels[k]` in [0, 1]: how likely a correct final answer is from the prefix ending with step k
(`posttrain prm` estimates it by Monte-Carlo rollouts; human labels fit as 0 / 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.loading import read_rows
from posttrain.data.packing import Batch, pack
from posttrain.data.records import DataError
from posttrain.data.tokenize import TokenizedExample, prompt_ids


def split_steps(text: str, separator: str) -> list[str]:
    """`text` cut after each `separator`; blank pieces join the step before them. Joined, the
    steps are `text` again."""
    if not separator:
        raise ValueError("the step separator is empty")
    steps: list[str] = []
    start = 0
    while start < len(text):
        cut = text.find(separator, start)
        end = len(text) if cut < 0 else cut + len(separator)
        piece = text[start:end]
        if steps and not piece.strip():
            steps[-1] += piece
        else:
            steps.append(piece)
        start = end
    return steps


@dataclass(frozen=True)
class StepRecord:
    prompt: str
    steps: list[str]
    labels: list[float]


def load_step_records(path: str | Path) -> list[StepRecord]:
    """Rows `{prompt, steps, labels}`; a bad row is a DataError naming the file, row and field."""
    records = []
    for row_number, row in read_rows(path):

        def error(field: str, problem: str, row_number: int = row_number) -> DataError:
            return DataError(str(path), row_number, field, problem)

        for key in ("prompt", "steps", "labels"):
            if key not in row:
                raise error(key, "missing; a step-label row is {prompt, steps, labels}")
        prompt, steps, labels = row["prompt"], row["steps"], row["labels"]
        if not isinstance(prompt, str):
            raise error("prompt", f"expected a string, got {type(prompt).__name__}")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise error("steps", "expected a non-empty list of strings")
        if not isinstance(labels, list) or len(labels) != len(steps):
            raise error("labels", f"expected a list of {len(steps)} numbers, one per step")
        for k, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, int | float) or not 0 <= label <= 1:
                raise error(f"labels[{k}]", f"expected a number in [0, 1], got {label!r}")
        records.append(StepRecord(prompt, list(steps), [float(x) for x in labels]))
    return records


def encode_steps(
    tokenizer: PreTrainedTokenizerBase, prompt: str, steps: list[str], chat: bool
) -> tuple[list[int], list[int]]:
    """The token ids of prompt + steps, and the index in them of each step's last token."""
    ids = prompt_ids(tokenizer, prompt, chat)
    ends = []
    for step in steps:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    return ids, ends


@dataclass
class StepBatch:
    batch: Batch
    positions: torch.Tensor
    """`(K,)` row positions of the K step ends, solution by solution."""
    counts: list[int]
    """Steps of each solution."""

    def to(self, device: torch.device) -> StepBatch:
        return StepBatch(self.batch.to(device), self.positions.to(device), self.counts)


def collate_steps(encoded: list[tuple[list[int], list[int]]]) -> StepBatch:
    """Pack `(ids, step ends)` solutions into one padding-free row."""
    batch = pack([TokenizedExample(ids, [False] * len(ids)) for ids, _ in encoded])
    offsets = batch.cu_seqlens[:-1].tolist()
    positions = [o + e for o, (_, ends) in zip(offsets, encoded, strict=True) for e in ends]
    return StepBatch(batch, torch.tensor(positions), [len(ends) for _, ends in encoded])
