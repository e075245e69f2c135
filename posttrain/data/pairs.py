"""Preference data for the DPO family: a prompt and two answers, tokenized and batched.

A `PairExample` holds a prompt's token ids and two answers': chosen and rejected, or for KTO a
labelled completion and a completion written for another prompt (KTO's KL estimate).
`collate_pairs` packs a micro-batch padding-free with each prompt once (`pack_shared`: the
prompt, then both answers, each attending to the prompt and itself), or as padded
`prompt + answer` rows; either way answer 2i is a pair's first and 2i + 1 its second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.packing import Batch, pack_shared, pad
from posttrain.data.records import DataError, LabeledRecord, PreferenceRecord
from posttrain.data.tokenize import (
    TokenizedExample,
    clip,
    completion_ids,
    longest_token_chars,
    over_limit,
    prompt_texts,
)


@dataclass
class PairExample:
    """Token ids of a prompt and two answers: chosen and rejected, or for KTO a completion and
    a completion written for another prompt (for the KL estimate)."""

    prompt: list[int]
    answers: tuple[list[int], list[int]]
    desirable: bool = True


@dataclass
class PairBatch:
    batch: Batch
    """Answers numbered 2i (chosen / KTO completion) and 2i + 1 (rejected / mismatched)."""
    lengths: torch.Tensor
    """(B, 2) answer token counts."""
    ref_logps: torch.Tensor | None
    """(B, 2) summed reference log-probs, or None (computed online, or not needed)."""
    desirable: torch.Tensor
    """(B,) KTO labels (True for pairs)."""

    @property
    def num_pairs(self) -> int:
        return len(self.desirable)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[PreferenceRecord | LabeledRecord],
    *,
    source: str,
    chat: bool,
    kto: bool,
    seed: int,
    max_length: int,
    max_prompt_length: int,
    truncate: bool,
) -> list[PairExample]:
    """Tokenize preference (or, for KTO, labeled or preference) records; a prompt or answer
    over its limit fails naming the row and field, unless `truncate` cuts the answer; a row far
    over its limit fails before it is tokenized whole (`over_limit`).

    KTO: each record's completion(s) become examples of their own, and example i's second
    answer is the completion of example j = next(i) in a seeded cyclic order of all examples
    (a derangement, so never its own completion), cut to fit `max_length`."""
    longest = longest_token_chars(tokenizer)
    prompt_limit = f"data.max_prompt_length={max_prompt_length}"
    length_limit = f"data.max_length={max_length}"
    cut_hint = " (set data.truncate=true to cut it)"
    rows = []  # (prompt ids, [(answer ids, label)]) per record
    for index, r in enumerate(records):
        fail = partial(DataError, source, r.row or index + 1)
        texts = (
            [("completion", r.completion, r.label)]
            if isinstance(r, LabeledRecord)
            else [("chosen", r.chosen, True), ("rejected", r.rejected, False)]
        )
        prompt_fields = prompt_texts(r.prompt)
        if found := over_limit(tokenizer, prompt_fields, max_prompt_length, longest):
            raise fail(found.field, found.problem("prompt", prompt_limit))
        answers = []
        for field, text, label in texts:
            if truncate:
                text = clip(tokenizer, text, max_length, longest)
            elif found := over_limit(
                tokenizer, [*prompt_fields, (field, text)], max_length, longest
            ):
                raise fail(found.field, found.problem(f"prompt + {field}", length_limit, cut_hint))
            prompt, answer = completion_ids(tokenizer, r.prompt, text, chat)
            if len(prompt) > max_prompt_length:
                raise fail("prompt", f"prompt is {len(prompt)} tokens, longer than {prompt_limit}")
            if len(prompt) + len(answer) > max_length:
                if not truncate:
                    raise fail(
                        field,
                        f"prompt + {field} is {len(prompt) + len(answer)} tokens (prompt "
                        f"{len(prompt)}, {field} {len(answer)}), longer than {length_limit}"
                        f"{cut_hint}",
                    )
                answer = answer[: max_length - len(prompt)]
            if not answer:
                raise fail(field, "no answer tokens left to train on")
            answers.append((answer, label))
        rows.append((prompt, answers))
    if not kto:
        return [PairExample(p, (a[0][0], a[1][0])) for p, a in rows]
    singles = [(p, ids, label) for p, answers in rows for ids, label in answers]
    order = list(range(len(singles)))
    random.Random(seed).shuffle(order)  # completion order[k + 1] is scored under prompt order[k]
    other = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
    return [
        PairExample(p, (ids, singles[other[i]][1][: max(1, max_length - len(p))]), label)
        for i, (p, ids, label) in enumerate(singles)
    ]


def collate_pairs(
    examples: list[PairExample], ref_logps: torch.Tensor | None, *, packed: bool, pad_id: int
) -> PairBatch:
    """Shared-prefix packing (prompt once, then both answers) or padded `prompt + answer` rows."""
    if packed:
        batch = pack_shared(
            [
                (e.prompt, [TokenizedExample(a, [True] * len(a)) for a in e.answers])
                for e in examples
            ]
        )
    else:
        batch = pad(
            [
                TokenizedExample(e.prompt + a, [False] * len(e.prompt) + [True] * len(a))
                for e in examples
                for a in e.answers
            ],
            pad_id,
        )
    lengths = torch.tensor([[len(a) for a in e.answers] for e in examples], dtype=torch.float32)
    desirable = torch.tensor([e.desirable for e in examples])
    return PairBatch(batch, lengths, ref_logps, desirable)
