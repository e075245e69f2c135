"""Attention for packed rows: each sequence attends to itself, and branches share a prefix.

A packed batch is one row `(1, N)` holding many sequences. Left to itself, transformers turns
the position-id restarts into an `N x N` block-diagonal mask and attends the whole row at once,
so its cost grows with the square of the row, not of the sequences. This module instead runs
PyTorch SDPA once per sequence (`is_causal`, no mask), which computes only the blocks that
exist (measured 1.8-2.2x faster training steps on the tiny and small models, same loss).

The same mechanism computes a **shared prefix** once: a group is a prefix (a prompt) followed by
branches (its answers), each branch attending to the prefix and, causally, to itself, with
position ids continuing from the prefix. DPO's chosen and rejected answers, and GRPO's G
completions of one prompt, then run the prompt's tokens once instead of once per answer; the
gradient still flows into the prefix through its keys and values, so loss and gradients equal
those of the separate sequences (tested).

How it plugs in: this module registers its function as transformers' "sdpa" attention. Called
without a layout it is exactly transformers' own `sdpa_attention_forward` (it delegates), so
nothing changes for padded batches or generation. A packed batch passes `packed_layout=` to the
model's forward, which transformers hands through to every attention call, and an empty 4-D
`attention_mask`, which makes transformers skip building any mask of its own (a model whose
attention does not come through here fails on that mask instead of attending wrongly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


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


@dataclass(frozen=True)
class _Block:
    """One SDPA call: queries [q0, q1) attend keys [k0, q1) under `mask` (or causally if None)."""

    q0: int
    q1: int
    k0: int
    mask: torch.Tensor | None


@dataclass
class PackedLayout:
    """Where the sequences of a packed row lie and which tokens each may attend to."""

    groups: tuple[Group, ...]
    _blocks: dict[torch.device, list[_Block]] = field(default_factory=dict, repr=False)

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

    def blocks(self, device: torch.device) -> list[_Block]:
        """The SDPA calls of one attention layer, built once per device and reused by every
        layer: a group with at most one branch is a single causal call; otherwise the prefix
        is one causal call and all branches are one call over the group's keys, masked so each
        branch sees the prefix and its own past only."""
        if device not in self._blocks:
            self._blocks[device] = [b for g in self.groups for b in _group_blocks(g, device)]
        return self._blocks[device]


def _group_blocks(g: Group, device: torch.device) -> list[_Block]:
    end = g.start + g.length
    if len(g.branches) <= 1:
        return [_Block(g.start, end, g.start, None)]
    body = g.length - g.prefix
    branch_of = torch.repeat_interleave(torch.arange(len(g.branches)), torch.tensor(g.branches)).to(
        device
    )
    sees_branch = (branch_of[:, None] == branch_of[None, :]) & torch.ones(
        body, body, dtype=torch.bool, device=device
    ).tril()
    sees_prefix = torch.ones(body, g.prefix, dtype=torch.bool, device=device)
    mask = torch.cat([sees_prefix, sees_branch], dim=1)
    blocks = [_Block(g.start + g.prefix, end, g.start, mask)]
    if g.prefix:
        blocks.insert(0, _Block(g.start, g.start + g.prefix, g.start, None))
    return blocks


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_layout: PackedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention contract (query `(1, H, N, D)`, key/value `(1, KV, N, D)`,
    returns `(1, N, H, D)`), attending per block of `packed_layout` when one is given."""
    if packed_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    for unsupported in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"packed attention does not support {unsupported!r} (model {type(module).__name__});"
                " set data.packing=false"
            )
    gqa = key.shape[1] != query.shape[1]
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, b.q0 : b.q1],
            key[:, :, b.k0 : b.q1],
            value[:, :, b.k0 : b.q1],
            attn_mask=b.mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=b.mask is None,
            enable_gqa=gqa,
        )
        for b in packed_layout.blocks(query.device)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def check_packed_support(model: torch.nn.Module) -> None:
    """Raise a clear error if `model` does not attend through this module (e.g. "eager")."""
    model = getattr(model, "module", model)  # DDP wraps the model
    implementation = model.config.get_text_config(decoder=True)._attn_implementation
    if implementation != "sdpa":
        raise ValueError(
            f"packed batches need attn_implementation='sdpa', but the model uses "
            f"{implementation!r}; set model.attn_implementation=sdpa or data.packing=false"
        )


def layout_mask(device: torch.device | str) -> torch.Tensor:
    """The empty 4-D mask a packed forward passes, so transformers builds no mask of its own."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


AttentionInterface.register("sdpa", packed_sdpa_forward)
