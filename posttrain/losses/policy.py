"""Policy-gradient losses: the PPO clipped surrogate (with clip-higher, dual clip and GSPO's
sequence-level ratio), the clipped value loss, and entropy.

Token tensors are padded `(B, T)` with a mask, or packed `(1, N)` with `cu_seqlens`; see
`posttrain.losses.aggregation`. Losses return `(loss, metrics)`; metrics are 0-d detached
tensors, averaged over unmasked tokens whatever the aggregation mode.
"""

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.aggregation import (
    AggMode,
    aggregate_loss,
    masked_mean,
    seq_mean,
    to_tokens,
    zero_masked,
)


def _token_log_ratio(log_ratio: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    return log_ratio


def _sequence_log_ratio(log_ratio: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    # GSPO-token (Zheng et al. 2025, Sec. 4.3): log s_it = sg[log s_i] + log pi_t - sg[log pi_t],
    # where log s_i is the mean token log-ratio of sequence i (the log of the geometric mean of
    # the token ratios). Its value is s_i at every token; its gradient is s_i * grad log pi_t.
    seq_log_ratio = seq_mean(log_ratio.detach(), mask, cu_seqlens)
    return to_tokens(seq_log_ratio, mask, cu_seqlens) + log_ratio - log_ratio.detach()


RATIO_LEVELS = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    agg: AggMode = "token_mean",
    cu_seqlens: Tensor | None = None,
    norm_length: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), written as a loss to minimize.

        r_t = exp(logprobs_t - old_logprobs_t)
        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high))
        if dual_clip = c and A_t < 0:  l_t = min(l_t, -c A_t)
        loss = aggregate_loss(l, mask, agg)

    - Clip-higher (DAPO, Yu et al. 2025, Sec. 3.1): `clip_eps_high` > `clip_eps_low` (e.g.
      0.28 vs 0.2) lets unlikely tokens grow; `None` means symmetric clipping.
    - Dual clip (Ye et al. 2020): with A < 0 the unclipped loss grows without
      bound in r; `dual_clip` = c > 1 caps it at -c A.
    - `ratio_level="sequence"` is GSPO (Zheng et al. 2025): r_t is replaced by the sequence
      ratio s_i = exp(mean_t log r_it) at every token of sequence i, in its GSPO-token form
      (the same gradient as GSPO for per-sequence advantages; with per-token advantages the
      gradient is GSPO-token's, s_i * A_t * grad log pi_t, which by design is not the
      derivative of the loss value). The paper pairs it with `agg="seq_mean_token_mean"` and
      clip_eps of 3e-4 / 4e-4.

    Args:
        logprobs: `(B, T)` log pi_theta of the sampled tokens, with grad.
        old_logprobs: `(B, T)` log pi_old of the same tokens (the sampler's), no grad.
        advantages: `(B, T)` per token, or `(B,)` per sequence (broadcast to its tokens).
        mask: `(B, T)` tokens that count. Packed: all token tensors `(1, N)`, plus
            `cu_seqlens`; per-sequence advantages are then `(S,)`.
        agg, norm_length, denominator: see `aggregate_loss`.

    Metrics: `clip_fraction` (tokens whose clipped term is the larger loss, so their
    gradient is zero), `dual_clip_fraction` (if `dual_clip`), `approx_kl` (k3 estimate of
    KL(pi_old || pi_theta): r - 1 - log r), `ratio_mean`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be a constant > 1, got {dual_clip}")
    try:
        level_log_ratio = RATIO_LEVELS[ratio_level]
    except KeyError:
        raise ValueError(
            f"unknown ratio_level {ratio_level!r}; expected one of {sorted(RATIO_LEVELS)}"
        ) from None
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = to_tokens(advantages, mask, cu_seqlens)
    log_ratio, advantages = zero_masked(mask, logprobs - old_logprobs, advantages)
    log_ratio = level_log_ratio(log_ratio, mask, cu_seqlens)
    ratio = torch.exp(log_ratio)

    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + eps_high)
    token_losses = torch.maximum(unclipped, clipped)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    if dual_clip is not None:
        capped = torch.minimum(token_losses, -advantages * dual_clip)
        negative = advantages < 0
        metrics["dual_clip_fraction"] = masked_mean(
            (negative & (capped < token_losses)).float(), mask
        )
        token_losses = torch.where(negative, capped, token_losses)

    loss = aggregate_loss(
        token_losses,
        mask,
        agg,
        cu_seqlens=cu_seqlens,
        norm_length=norm_length,
        denominator=denominator,
    )
    with torch.no_grad():
        metrics["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, mask)
        metrics["ratio_mean"] = masked_mean(ratio, mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
    agg: AggMode = "token_mean",
    cu_seqlens: Tensor | None = None,
    norm_length: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, as in OpenAI baselines' PPO2 (not in the PPO paper).

        v_clip = old_values + clip(values - old_values, -clip_eps, clip_eps)
        l_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
        loss = aggregate_loss(l, mask, agg)

    `clip_eps=None` gives the plain 0.5 * squared error.

    Args:
        values: `(B, T)` current value predictions, with grad.
        old_values: `(B, T)` the predictions made at rollout time, no grad.
        returns: `(B, T)` targets (e.g. from `gae`).
        mask: `(B, T)`. Packed: all `(1, N)` plus `cu_seqlens`.

    Metrics: `value_clip_fraction` (tokens where the clipped error is the larger),
    `value_error` (mean squared error of `values`, unclipped).
    """
    mask = mask.bool()
    values, old_values, returns = zero_masked(mask, values, old_values, returns)
    unclipped = (values - returns) ** 2
    token_losses = unclipped
    clipped = unclipped
    if clip_eps is not None:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
        token_losses = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(
        0.5 * token_losses,
        mask,
        agg,
        cu_seqlens=cu_seqlens,
        norm_length=norm_length,
        denominator=denominator,
    )
    metrics = {
        "value_clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach(),
        "value_error": masked_mean(unclipped, mask).detach(),
    }
    return loss, metrics


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution: `(..., V)` logits -> `(...)`.

    H = logsumexp(z) - sum_v softmax(z)_v z_v
    """
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def entropy_from_logits(
    logits: Tensor,
    mask: Tensor,
    *,
    agg: AggMode = "token_mean",
    cu_seqlens: Tensor | None = None,
    norm_length: float | None = None,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Aggregated entropy of the policy over unmasked tokens, a 0-d tensor with grad.

    `token_entropy` of `logits` `(B, T, V)` (packed `(1, N, V)`), reduced with
    `aggregate_loss`, masked mean by default. Add `-ent_coef * entropy` to a loss for an
    entropy bonus, or log it detached.
    """
    mask = mask.bool()
    (logits,) = zero_masked(mask[..., None], logits)
    return aggregate_loss(
        token_entropy(logits),
        mask,
        agg,
        cu_seqlens=cu_seqlens,
        norm_length=norm_length,
        denominator=denominator,
    )
