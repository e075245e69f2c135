"""Batches for training: padding-free packing, and a padded path for models that need it.

Packed: the sequences of a micro-batch are concatenated into one row `(1, N)` with position ids
restarting at 0 for each sequence and no attention mask. Hugging Face models that build their
mask with `create_causal_mask` (Llama, Qwen2, Mistral, Gemma, ...) read the restarts as sequence
boundaries and attend block-diagonally, so no pad token is ever computed. The model must run
with `use_cache=False`: a cache turns that detection off.

Padded: right-padded `(B, T)` rows with an attention mask, for models whose attention cannot
take packed input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.data.tokenize import TokenizedExample

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(1, N) packed or (B, T) padded token ids."""
    position_ids: torch.Tensor
    """Same shape as input_ids; restarts at 0 for each packed sequence."""
    labels: torch.Tensor
    """Same shape; the token id where it is a training target, IGNORE elsewhere."""
    attention_mask: torch.Tensor | None
    """(B, T) for padded batches, None for packed ones."""
    cu_seqlens: torch.Tensor
    """(S + 1,) sequence start offsets in the flattened tokens, as flash-attention takes them."""

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM forward."""
        inputs = dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False)
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def _labels(example: TokenizedExample) -> list[int]:
    return [t if m else IGNORE for t, m in zip(example.input_ids, example.loss_mask, strict=True)]


def pack(examples: Sequence[TokenizedExample]) -> Batch:
    """Concatenate `examples` into one (1, N) row with reset position ids."""
    lengths = [len(e.input_ids) for e in examples]
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in _labels(e)]
    positions = [p for n in lengths for p in range(n)]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return Batch(as_row(ids), as_row(positions), as_row(labels), None, cu)


def pad(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad `examples` to the longest into (B, T) rows with an attention mask."""
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(_labels(e))
        mask[row, :n] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return Batch(ids, positions, labels, mask, cu)


def collate(examples: Sequence[TokenizedExample], packed: bool, pad_id: int) -> Batch:
    return pack(examples) if packed else pad(examples, pad_id)
