"""Where the sequences of a packed row lie: groups of a prefix (a prompt) and its branches
(answers), with the position ids, predecessor indices and sequence numbers that follow.

A layout is pure bookkeeping over token offsets; the attention that reads it lives in
`posttrain.models.packed_attention`, which caches its per-device plan in `attention_plans`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Group:
    """A prefix of `prefix` tokens starting at `start`, followed by branches of the given lengths.

    A plain sequence is a group with no branches (the prefix is the whole sequence)."""

    start: int
    prefix: int
    branches: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.prefix + sum(self.branches)


@dataclass
class PackedLayout:
    """Where the sequences of a packed row lie and which tokens each may attend to."""

    groups: tuple[Group, ...]
    attention_plans: dict[Any, Any] = field(default_factory=dict, repr=False)
    """Filled by the attention (one plan per device), so every layer reuses one plan."""

    @classmethod
    def sequences(cls, lengths: Sequence[int]) -> PackedLayout:
        """Plain packing: independent sequences of the given lengths, one after another."""
        starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
        return cls(tuple(Group(s, n) for s, n in zip(starts, lengths, strict=False)))

    @property
    def num_tokens(self) -> int:
        return sum(g.length for g in self.groups)

    def position_ids(self) -> list[int]:
        """Positions restart at 0 for each group; every branch continues from its prefix."""
        positions: list[int] = []
        for g in self.groups:
            positions += range(g.prefix)
            for n in g.branches:
                positions += range(g.prefix, g.prefix + n)
        return positions

    def previous_index(self) -> torch.Tensor:
        """`(N,)`: the index of the token each token follows in its own sequence, -1 at a start.

        The first token of a branch follows the last token of its prefix; the logits there
        predict it."""
        prev = torch.arange(-1, self.num_tokens - 1)
        for g in self.groups:
            prev[g.start] = -1
            offset = g.start + g.prefix
            for n in g.branches:
                prev[offset] = g.start + g.prefix - 1 if g.prefix else -1
                offset += n
        return prev

    def sequence_ids(self) -> torch.Tensor:
        """`(N,)`: which sequence each token belongs to, numbering a group's branches as its
        sequences (its shared prefix tokens get -1) and a group without branches as one."""
        ids = torch.full((self.num_tokens,), -1, dtype=torch.long)
        seq = 0
        for g in self.groups:
            if not g.branches:
                ids[g.start : g.start + g.prefix] = seq
                seq += 1
                continue
            offset = g.start + g.prefix
            for n in g.branches:
                ids[offset : offset + n] = seq
                offset += n
                seq += 1
        return ids
