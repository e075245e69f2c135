"""Token layouts, per-sequence reductions and the loss aggregation modes.

Every token-level function in `posttrain.losses` accepts two layouts:

- padded: values `(B, T)` with `mask` `(B, T)`; each row is one sequence.
- packed: values `(1, N)` with `mask` `(1, N)` and `cu_seqlens` `(S + 1,)`, the flash-attn
  convention `[0, len_0, len_0 + len_1, ..., N]`: sequence `s` owns tokens
  `cu_seqlens[s]:cu_seqlens[s + 1]`, and `cu_seqlens[-1]` must equal `N` (put any trailing
  padding in a last, fully masked segment).

`mask` (bool, or 0/1) marks the tokens that count, e.g. completion tokens; a packed row keeps
its prompt tokens, masked out. Functions replace masked positions with zero before any
arithmetic, so whatever they hold (padding, garbage, inf, nan) changes neither a result nor a
gradient.

The mechanism lives here once: wherever a function needs whole sequences, `unpack` turns packed
tokens into padded rows `(S, L)` (L = longest sequence), the per-sequence maths is written for
rows, and `pack` turns token-shaped results back.
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def _row_index(cu_seqlens: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Gather index `(S, L)` into the packed row, its validity `(S, L)`, and N."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    total, max_len = torch.stack([cu[-1], lengths.max()]).tolist()  # one host sync
    offsets = torch.arange(max_len, device=device)
    index = (cu[:-1, None] + offsets).clamp(max=max(total - 1, 0))
    return index, offsets < lengths[:, None], total


def unpack(cu_seqlens: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """Packed token tensors `(1, N)` -> padded rows `(S, L)`, zero (False) past each end.

    With `cu_seqlens=None` the tensors are already rows and come back unchanged, so callers
    write `x, mask = unpack(cu_seqlens, x, mask)` once and handle both layouts.
    """
    if cu_seqlens is None:
        return list(tensors)
    index, valid, total = _row_index(cu_seqlens, tensors[0].device)
    rows = []
    for x in tensors:
        flat = x.reshape(-1)
        if flat.numel() != total:
            raise ValueError(
                f"cu_seqlens ends at {total} but the packed tensor holds {flat.numel()} tokens;"
                " expected cu_seqlens[-1] == N for a (1, N) tensor"
            )
        rows.append(torch.where(valid, flat[index], flat.new_zeros(())))
    return rows


def pack(cu_seqlens: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """Padded rows `(S, L)` -> packed `(1, N)`; the inverse of `unpack` (identity if None)."""
    if cu_seqlens is None:
        return list(tensors)
    _, valid, _ = _row_index(cu_seqlens, tensors[0].device)
    return [x[valid].reshape(1, -1) for x in tensors]


def zero_masked(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Each tensor with masked-out positions set to 0, so garbage there cannot leak."""
    return [torch.where(mask, x, 0.0) for x in tensors]


def seq_sum(values: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Sum of the unmasked tokens of each sequence: `(B, T)` or packed `(1, N)` -> `(S,)`."""
    values, mask = unpack(cu_seqlens, values, mask.bool())
    return torch.where(mask, values, 0.0).sum(-1)


def seq_count(mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Number of unmasked tokens of each sequence, `(S,)` int64."""
    (mask,) = unpack(cu_seqlens, mask.bool())
    return mask.sum(-1)


def seq_mean(values: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Mean of the unmasked tokens of each sequence, `(S,)`; 0 for a sequence with none."""
    return seq_sum(values, mask, cu_seqlens) / seq_count(mask, cu_seqlens).clamp(min=1)


def to_tokens(per_seq: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Broadcast one value per sequence `(S,)` to every token: the shape of `mask`."""
    if cu_seqlens is None:
        return per_seq[:, None].expand(mask.shape)
    _, valid, _ = _row_index(cu_seqlens, per_seq.device)
    return per_seq[:, None].expand(valid.shape)[valid].reshape(mask.shape)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over all unmasked tokens of the batch, 0-d; either layout."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


# Each mode returns (numerator, default denominator); see `aggregate_loss`.
def _token_mean(x: Tensor, mask: Tensor, cu: Tensor | None, norm: float | None):
    return torch.where(mask, x, 0.0).sum(), mask.sum()


def _seq_mean_token_mean(x: Tensor, mask: Tensor, cu: Tensor | None, norm: float | None):
    return seq_mean(x, mask, cu).sum(), (seq_count(mask, cu) > 0).sum()


def _seq_mean_token_sum_norm(x: Tensor, mask: Tensor, cu: Tensor | None, norm: float | None):
    if norm is None:
        raise ValueError(
            "loss aggregation 'seq_mean_token_sum_norm' needs norm_length, a constant such as"
            " the maximum completion length (Dr. GRPO, Liu et al. 2025)"
        )
    return seq_sum(x, mask, cu).sum() / norm, (seq_count(mask, cu) > 0).sum()


AGGREGATIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate_loss(
    token_losses: Tensor,
    mask: Tensor,
    mode: AggMode = "token_mean",
    *,
    cu_seqlens: Tensor | None = None,
    norm_length: float | None = None,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses `(B, T)` (or packed `(1, N)`) to a scalar.

    - `token_mean` (DAPO, Yu et al. 2025, Sec. 3.3): `sum_{i,t} l_it / sum_i |o_i|`;
      every token weighs the same, so long sequences weigh more.
    - `seq_mean_token_mean` (GRPO, Shao et al. 2024, eq. 3):
      `1/G sum_i (1/|o_i| sum_t l_it)`; every sequence weighs the same.
    - `seq_mean_token_sum_norm` (Dr. GRPO, Liu et al. 2025):
      `1/G sum_i (sum_t l_it / norm_length)` with a constant `norm_length` (e.g. the maximum
      completion length), which removes GRPO's length bias.

    Sequences with no unmasked token are left out of G. `denominator` replaces the count this
    call sees (tokens for `token_mean`, sequences otherwise): pass the count over the whole
    batch when it is split into micro-batches, so that the micro-batch losses add up to the
    loss of the whole batch.
    """
    try:
        reduce = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown loss aggregation {mode!r}; expected one of {sorted(AGGREGATIONS)}"
        ) from None
    numerator, count = reduce(token_losses, mask.bool(), cu_seqlens, norm_length)
    return numerator / (count.clamp(min=1) if denominator is None else denominator)
