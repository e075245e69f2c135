"""Batches for training: padding-free packing, and a padded path for models that need it.

Packed: the sequences of a micro-batch are concatenated into one row `(1, N)` with position ids
restarting at 0 for each sequence, and a `PackedLayout` (`layout.py`) saying where each
sequence lies; the attention in `posttrain.models.packed_attention` then attends within each
sequence only, so no pad token is ever computed. `pack_shared` packs groups whose answers share one prompt: the
prompt's tokens appear (and are computed) once per group.

Padded: right-padded `(B, T)` rows with an attention mask, for models whose attention cannot
take packed input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.data.layout import Group, PackedLayout
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
    """(G + 1,) start offsets of the packed groups (sequences, or prompts with their answers) in
    the flattened tokens."""
    layout: PackedLayout | None = None
    """For packed batches: where each sequence lies and what it attends to."""

    @property
    def packed(self) -> bool:
        return self.layout is not None

    @property
    def num_tokens(self) -> int:
        """Real tokens the forward computes (pads excluded)."""
        return self.input_ids.numel() if self.packed else int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if torch.is_tensor(t) else t  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed batches: `(K,)` indices of the target tokens in the row, and `(K,)` indices
        of the tokens whose logits predict them (for a shared prompt's answers, every answer's
        first token is predicted from the prompt's last token)."""
        targets = (self.labels[0] != IGNORE).nonzero().squeeze(1)
        predictors = self.layout.previous_index().to(targets.device)[targets]
        return targets, predictors

    def target_sequence_ids(self) -> torch.Tensor:
        """`(K,)`: which sequence each target token belongs to, in the order `target_logprobs`
        returns them. Sequences are numbered in packing order: each answer of a shared prompt
        is one sequence (`pack_shared`), and so is each example of `pack` or `pad`."""
        if self.packed:
            targets, _ = self.target_positions()
            return self.layout.sequence_ids().to(targets.device)[targets]
        rows = torch.arange(self.labels.shape[0], device=self.labels.device)
        is_target = self.labels[:, 1:] != IGNORE
        return rows[:, None].expand_as(is_target)[is_target]


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
    layout = PackedLayout.sequences(lengths)
    return Batch(as_row(ids), as_row(positions), as_row(labels), None, cu, layout)


def pack_shared(groups: Sequence[tuple[Sequence[int], Sequence[TokenizedExample]]]) -> Batch:
    """Pack `(prompt_ids, answers)` groups: each prompt once, then its answers, each attending
    to the prompt and itself. An answer's `input_ids` are its tokens alone (without the prompt)
    and its `loss_mask` may mark its first token, which the prompt's last token predicts.
    Position ids continue from the prompt, so the model sees exactly `prompt + answer`."""
    ids: list[int] = []
    labels: list[int] = []
    layout_groups = []
    for prompt, answers in groups:
        layout_groups.append((len(ids), len(prompt), tuple(len(a.input_ids) for a in answers)))
        ids += prompt
        labels += [IGNORE] * len(prompt)
        for a in answers:
            ids += a.input_ids
            labels += _labels(a)

    layout = PackedLayout(tuple(Group(*g) for g in layout_groups))
    cu = torch.tensor([*(g[0] for g in layout_groups), len(ids)])
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return Batch(as_row(ids), as_row(layout.position_ids()), as_row(labels), None, cu, layout)


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
