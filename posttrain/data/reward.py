"""Reward-model data: each prompt's responses tokenized once, with the pairs to compare.

A `Comparison` is one prompt and its K >= 2 responses (a preference pair is K = 2, chosen first)
plus the pairs `(better, worse, head, margin)` the loss compares. Responses are tokenized and
run once each; a ranking's K(K-1)/2 pairs only index their scores (InstructGPT, Ouyang et al.
2022, Sec. 3.5: "we put all K(K-1)/2 comparisons from each prompt in a single batch element").

Token layout, the same for training (`tokenize_comparisons`) and scoring (`RewardEncoder.fit`):

- Decoders: the prompt's tokens (chat template with the generation prompt, when used) followed
  by the response's (through its end-of-turn / eos); trailing tokens equal to the pad id are
  dropped, because Hugging Face's plain classifier scores the rightmost non-pad token.
- Encoders: the tokenizer's own text-pair layout (`[CLS] prompt [SEP] response [SEP]` for
  BERT), with its token type ids.

Too long: an error naming the row and field, or with `truncate`, the prompt is cut from the
left (its end, next to the answer, is what matters most) so that prompt + the longest response
fits; a response longer than the limit on its own keeps its last tokens. All responses of a
comparison keep the same prompt tokens, so a decoder computes the prompt once for all of them.
A row far over a limit fails, or with `truncate` is cut, before it is tokenized whole
(`over_limit` and `clip` in `posttrain.data.tokenize`).

Multi-objective heads: with named heads, a row column named after a head holds one number per
response (pairs: `[chosen, rejected]`; rankings: in the order of `responses`), higher is better;
every pair with different numbers trains that head, equal numbers are a tie and train nothing.
A head whose column is absent or null follows the row's order. The row's `margin` applies to
pairs that follow the row's order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.packing import Batch, pack, pack_shared, pad
from posttrain.data.records import DataError, PreferenceRecord, Prompt, RankingRecord
from posttrain.data.tokenize import (
    TokenizedExample,
    clip,
    completion_ids,
    longest_token_chars,
    over_limit,
    prompt_texts,
)

Layout = Literal["shared", "packed", "padded"]


class RewardEncoder:
    """Prompt and response token ids, and how to join them into one scored sequence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, decoder: bool, chat: bool):
        self.tokenizer, self.decoder, self.chat = tokenizer, decoder, chat
        self.pad_id = tokenizer.pad_token_id
        self.special = 0 if decoder else self._pair_template()

    def _pair_template(self) -> int:
        """Find the special tokens around a text pair by encoding a known pair ("a", "b")."""
        tok = self.tokenizer
        a, b = (tok(s, add_special_tokens=False)["input_ids"] for s in ("a", "b"))
        enc = tok("a", "b")
        ids, types = enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        i = next(i for i in range(len(ids)) if ids[i : i + len(a)] == a)
        j = next(j for j in range(i + len(a), len(ids)) if ids[j : j + len(b)] == b)
        self._pre, self._mid, self._post = ids[:i], ids[i + len(a) : j], ids[j + len(b) :]
        self._types = (types[:i], types[i], types[i + len(a) : j], types[j], types[j + len(b) :])
        return len(self._pre) + len(self._mid) + len(self._post)

    def _prompt_text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str) and not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.chat:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def encode(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) without the encoder's special tokens."""
        if self.decoder:
            head, tail = completion_ids(self.tokenizer, prompt, response, self.chat)
            while tail and tail[-1] == self.pad_id:
                tail = tail[:-1]
            return head, tail
        text_ids = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return text_ids(self._prompt_text(prompt)), text_ids(response)

    def join(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int] | None]:
        """The scored sequence's ids, and its token type ids (encoders) or None."""
        if self.decoder:
            return prompt + response, None
        pre, a, mid, b, post = self._types
        ids = self._pre + prompt + self._mid + response + self._post
        return ids, pre + [a] * len(prompt) + mid + [b] * len(response) + post

    def fit(
        self, prompt: list[int], responses: list[list[int]], max_length: int
    ) -> tuple[list[int], list[list[int]]]:
        """Truncate as the module docstring says so every joined sequence has <= max_length."""
        limit = max_length - self.special
        responses = [r[-limit:] for r in responses]
        room = max(0, limit - max(len(r) for r in responses))
        return prompt[len(prompt) - min(room, len(prompt)) :], responses


@dataclass
class Comparison:
    prompt_ids: list[int]
    """The prompt's tokens (no special tokens of an encoder's pair layout)."""
    response_ids: list[list[int]]
    """Each response's tokens, best first for the row's own order."""
    pairs: list[tuple[int, int, int, float]]
    """(better, worse, head, margin): response indices, head index, Bradley-Terry margin."""
    order: list[tuple[int, int]]
    """The row's own order as (better, worse) pairs: what accuracy is measured on."""


def _ratings(record, head: str, k: int, source: str, row: int) -> list[float] | None:
    value = record.fields.get(head)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != k
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    ):
        raise DataError(
            source, row, head,
            f"expected a list of {k} finite numbers (one per response, higher is better), "
            f"got {value!r}",
        )  # fmt: skip
    return [float(v) for v in value]


def tokenize_comparisons(
    encoder: RewardEncoder,
    records: Sequence[PreferenceRecord | RankingRecord],
    *,
    source: str,
    heads: Sequence[str],
    max_length: int,
    max_prompt_length: int,
    truncate: bool = False,
) -> list[Comparison]:
    """Tokenize pair and ranking records; a DataError names the row and field of any problem.

    `heads` empty or one name: a single head trained on the rows' order; more: head columns as
    the module docstring says."""
    read_columns = len(heads) > 1
    tokenizer = encoder.tokenizer
    longest = longest_token_chars(tokenizer)
    prompt_limit = f"data.max_prompt_length={max_prompt_length}"
    length_limit = f"data.max_length={max_length}"
    comparisons = []
    for index, record in enumerate(records):
        row = record.row or index + 1
        fail = partial(DataError, source, row)
        if isinstance(record, PreferenceRecord):
            texts, names, margin = (
                [record.chosen, record.rejected],
                ["chosen", "rejected"],
                record.margin,
            )
        else:
            texts = record.responses
            names, margin = [f"responses[{k}]" for k in range(len(texts))], None
        prompt = record.prompt
        if truncate:  # truncation keeps the ends: of the prompt and of each response
            prompt = _clip_prompt(tokenizer, prompt, max_prompt_length, longest)
            texts = [clip(tokenizer, t, max_length, longest, keep_end=True) for t in texts]
        else:
            prompt_fields = prompt_texts(prompt)
            if found := over_limit(tokenizer, prompt_fields, max_prompt_length, longest):
                hint = " (set data.truncate=true to cut it from the left)"
                raise fail(found.field, found.problem("prompt", prompt_limit, hint))
            for name, text in zip(names, texts, strict=True):
                found = over_limit(tokenizer, [*prompt_fields, (name, text)], max_length, longest)
                if found:
                    hint = " (set data.truncate=true to cut the prompt from the left)"
                    raise fail(found.field, found.problem("prompt + response", length_limit, hint))
        try:
            encoded = [encoder.encode(prompt, text) for text in texts]
        except ValueError as err:  # a conversation prompt without a chat template
            raise fail("prompt", str(err)) from None
        prompt = encoded[0][0]
        responses = [tail for _, tail in encoded]
        for name, tail in zip(names, responses, strict=True):
            if not tail:
                raise fail(name, "no tokens left after tokenization")
        if len(prompt) > max_prompt_length:
            if not truncate:
                raise fail(
                    "prompt",
                    f"prompt is {len(prompt)} tokens, longer than {prompt_limit} "
                    "(set data.truncate=true to cut it from the left)",
                )
            prompt = prompt[-max_prompt_length:]
        longest_response = max(range(len(texts)), key=lambda k: len(responses[k]))
        total = len(prompt) + len(responses[longest_response]) + encoder.special
        if total > max_length:
            if not truncate:
                special = f", special tokens {encoder.special}" if encoder.special else ""
                raise fail(
                    names[longest_response],
                    f"prompt + response is {total} tokens (prompt {len(prompt)}, response "
                    f"{len(responses[longest_response])}{special}), longer than {length_limit} "
                    "(set data.truncate=true to cut the prompt from the left)",
                )
            prompt, responses = encoder.fit(prompt, responses, max_length)
        k = len(texts)
        order = [(i, j) for i in range(k) for j in range(i + 1, k)]
        pairs = []
        for h, head in enumerate(heads or ["reward"]):
            ratings = _ratings(record, head, k, source, row) if read_columns else None
            if ratings is None:
                pairs += [(i, j, h, margin or 0.0) for i, j in order]
            else:
                pairs += [
                    (i, j, h, 0.0) for i in range(k) for j in range(k) if ratings[i] > ratings[j]
                ]
        comparisons.append(Comparison(prompt, responses, pairs, order))
    return comparisons


def _clip_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, limit: int, longest: int
) -> Prompt:
    """`prompt` with each text cut to the end that truncation to `limit` tokens keeps (`clip`)."""
    if isinstance(prompt, str):
        return clip(tokenizer, prompt, limit, longest, keep_end=True)
    return [
        {**m, "content": clip(tokenizer, m["content"], limit, longest, keep_end=True)}
        for m in prompt
    ]


@dataclass
class RewardBatch:
    """A micro-batch of comparisons: the sequences to score and the pairs to compare.

    Pair tensors index the batch's sequences, numbered comparison by comparison, response by
    response. `weight` is 1 / (number of pairs of that head in that comparison), so each
    comparison weighs the same however many responses it ranks (InstructGPT eq. 1)."""

    batch: Batch
    last_index: torch.Tensor | None
    """(S,) packed layouts: the row position of each sequence's last token."""
    token_type_ids: torch.Tensor | None
    """(S, T) for encoders with segment ids, else None."""
    better: torch.Tensor
    worse: torch.Tensor
    head: torch.Tensor
    margin: torch.Tensor
    weight: torch.Tensor
    """(P,) each: the pairs the loss compares, over all heads."""
    order_better: torch.Tensor
    order_worse: torch.Tensor
    order_weight: torch.Tensor
    """(Q,) each: the rows' own order, for accuracy."""
    num_comparisons: int

    def to(self, device: torch.device | str) -> RewardBatch:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        moved = {
            k: v.to(device) if torch.is_tensor(v) or k == "batch" else v for k, v in values.items()
        }
        return RewardBatch(**moved)


def collate_comparisons(
    comparisons: Sequence[Comparison], encoder: RewardEncoder, layout: Layout
) -> RewardBatch:
    """Build the micro-batch: 'shared' packs each prompt once followed by its responses
    (decoders), 'packed' packs prompt + response per sequence, 'padded' right-pads rows."""
    pair_rows, order_rows, offset = [], [], 0
    for c in comparisons:
        per_head = Counter(h for _, _, h, _ in c.pairs)
        pair_rows += [(offset + b, offset + w, h, m, 1 / per_head[h]) for b, w, h, m in c.pairs]
        order_rows += [(offset + b, offset + w, 1 / len(c.order)) for b, w in c.order]
        offset += len(c.response_ids)
    column = lambda rows, i, dtype: torch.tensor([r[i] for r in rows], dtype=dtype)  # noqa: E731
    examples = lambda seqs: [TokenizedExample(s, [False] * len(s)) for s in seqs]  # noqa: E731
    token_types = last = None
    if layout == "shared":
        batch = pack_shared([(c.prompt_ids, examples(c.response_ids)) for c in comparisons])
        ends, position = [], 0
        for c in comparisons:
            position += len(c.prompt_ids)
            for r in c.response_ids:
                position += len(r)
                ends.append(position - 1)
        last = torch.tensor(ends)
    else:
        joined = [encoder.join(c.prompt_ids, r) for c in comparisons for r in c.response_ids]
        if layout == "packed":
            batch = pack(examples([ids for ids, _ in joined]))
            last = torch.tensor([len(ids) for ids, _ in joined]).cumsum(0) - 1
        else:
            batch = pad(examples([ids for ids, _ in joined]), encoder.pad_id)
            if joined[0][1] is not None:
                token_types = torch.zeros_like(batch.input_ids)
                for i, (_, types) in enumerate(joined):
                    token_types[i, : len(types)] = torch.tensor(types)
    return RewardBatch(
        batch, last, token_types,
        column(pair_rows, 0, torch.long), column(pair_rows, 1, torch.long),
        column(pair_rows, 2, torch.long), column(pair_rows, 3, torch.float32),
        column(pair_rows, 4, torch.float32),
        column(order_rows, 0, torch.long), column(order_rows, 1, torch.long),
        column(order_rows, 2, torch.float32), len(comparisons),
    )  # fmt: skip
