"""Advantages and returns: GAE, whitening, group baselines (GRPO, Dr. GRPO, RLOO),
REINFORCE++, and process (step-level) rewards.

These are not losses: each returns tensors only, computed under `torch.no_grad()`, since
advantages are constants in the policy loss. Token tensors are padded `(B, T)` with a mask or
packed `(1, N)` with `cu_seqlens` (see `posttrain.losses.aggregation`); per-sequence tensors
are `(B,)` (packed: `(S,)`). Group functions take rewards `(B,)` laid out as consecutive
groups of `group_size` completions of the same prompt.
"""

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.aggregation import masked_mean, pack, to_tokens, unpack

ProcessReduction = Literal["min", "last", "sum"]


def _gae_rows(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over padded rows `(S, L)`; masked tokens are skipped, not treated as steps."""
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid, advantage, 0.0)
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    return advantages, torch.where(mask, advantages + values, 0.0)


@torch.no_grad()
def score_at_last_token(scores: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Place each sequence's scalar score `(B,)` on its last unmasked token: `(B, T)`, 0
    elsewhere (packed: `(S,)` -> `(1, N)`). A sequence with no unmasked token gets nothing."""
    (mask_rows,) = unpack(cu_seqlens, mask.bool())
    positions = torch.arange(mask_rows.shape[1], device=mask.device)
    last = torch.where(mask_rows, positions, -1).amax(-1, keepdim=True)
    placed = torch.where(positions == last, scores[:, None], 0.0)
    (placed,) = pack(cu_seqlens, placed)
    return placed.reshape(mask.shape)


@torch.no_grad()
def gae(
    values: Tensor,
    mask: Tensor,
    *,
    scores: Tensor | None = None,
    token_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) for token sequences.

    Rewards follow Ziegler et al. 2019 / InstructGPT: `r_t = token_rewards_t` (e.g. the KL
    penalty `-kl_coef * kl_t` from `kl_penalty_rewards`), plus the sequence's `score` at its
    last unmasked token. Then, over unmasked tokens t < t' (t' the next unmasked token),

        delta_t = r_t + gamma * V_t' - V_t        (V after the last token is 0: terminal)
        A_t = delta_t + gamma * lam * A_t'
        returns_t = A_t + V_t

    Masked tokens (padding, or prompt and tool-output tokens inside a packed row) are skipped
    and get A = returns = 0.

    Args:
        values: `(B, T)` value predictions V_t at rollout time.
        mask: `(B, T)`. Packed: token tensors `(1, N)` plus `cu_seqlens`, scores `(S,)`.
        scores: `(B,)` sequence-level reward (reward model, verifier), optional.
        token_rewards: `(B, T)` per-token rewards, optional.

    Returns:
        advantages, returns: both `(B, T)` (packed: `(1, N)`).
    """
    mask = mask.bool()
    rewards = torch.zeros_like(values) if token_rewards is None else token_rewards.to(values)
    if scores is not None:
        rewards = rewards + score_at_last_token(scores, mask, cu_seqlens).to(values)
    rewards, values, mask_rows = unpack(cu_seqlens, rewards, values, mask)
    rewards, values = (torch.where(mask_rows, x, 0.0) for x in (rewards, values))
    advantages, returns = _gae_rows(rewards, values, mask_rows, gamma, lam)
    advantages, returns = pack(cu_seqlens, advantages, returns)
    return advantages.reshape(mask.shape), returns.reshape(mask.shape)


@torch.no_grad()
def returns_to_go(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, cu_seqlens: Tensor | None = None
) -> Tensor:
    """Discounted reward-to-go `G_t = sum_{k >= 0} gamma^k r_{t+k}` over unmasked tokens.

    `(B, T)` -> `(B, T)` (packed `(1, N)`); GAE with V = 0 and lam = 1.
    """
    advantages, _ = gae(
        torch.zeros_like(token_rewards),
        mask,
        token_rewards=token_rewards,
        gamma=gamma,
        lam=1.0,
        cu_seqlens=cu_seqlens,
    )
    return advantages


@torch.no_grad()
def masked_whiten(
    values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalize with the mean and variance of the unmasked tokens only.

        w = (x - mean) / sqrt(var + eps)      (+ mean again if not shift_mean)

    `var` is the population variance (divides by the count, no Bessel correction). Any shape,
    e.g. `(B, T)` or packed `(1, N)`; masked positions come back 0.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    var = masked_mean((torch.where(mask, values, mean) - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def _floating(x: Tensor) -> Tensor:
    """Rewards as floats of at least 32 bits (bool/int -> float32, bf16 -> float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards hold {rewards.numel()} values, which do not split into groups of"
            f" group_size={group_size}; expected group_size >= 2 dividing the batch"
        )
    return rewards.reshape(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages, one per completion: `(B,)` -> `(B,)`.

    GRPO (Shao et al. 2024, Sec. 4.1.2): `A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`,
    std with Bessel's correction (as in TRL and verl). Dr. GRPO (Liu et al. 2025):
    `scale_by_std=False` gives `A_i = r_i - mean(r_group)`, removing the difficulty bias.
    """
    groups = _groups(_floating(rewards), group_size)
    advantages = groups - groups.mean(-1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.reshape(rewards.shape)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): `(B,)` -> `(B,)`.

    A_i = r_i - 1/(G-1) sum_{j != i} r_j
    """
    groups = _groups(_floating(rewards), group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(rewards.shape)


@torch.no_grad()
def reinforce_plus_plus_advantages(
    scores: Tensor,
    mask: Tensor,
    *,
    token_rewards: Tensor | None = None,
    group_size: int | None = None,
    gamma: float = 1.0,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ (Hu 2025): token returns normalized over the whole batch.

        r_t = token_rewards_t + score * [t is the last unmasked token]
        G_t = sum_{k >= 0} gamma^k r_{t+k}
        A = masked_whiten(G, mask)         (mean and std over every unmasked token of the batch)

    With `group_size`, the REINFORCE++-baseline variant: each score first has the mean score
    of its group subtracted, `score_i - mean(score_group)`, then the same batch normalization.

    Args:
        scores: `(B,)` sequence rewards (packed: `(S,)`).
        mask: `(B, T)` (packed: `(1, N)` plus `cu_seqlens`).
        token_rewards: `(B, T)` per-token rewards, e.g. `kl_penalty_rewards`, optional.

    Returns:
        advantages `(B, T)` (packed `(1, N)`), 0 at masked tokens.
    """
    scores = _floating(scores)
    if group_size is not None:
        groups = _groups(scores, group_size)
        scores = (groups - groups.mean(-1, keepdim=True)).reshape(scores.shape)
    rewards = score_at_last_token(scores, mask, cu_seqlens)
    if token_rewards is not None:
        rewards = rewards + token_rewards.to(rewards)
    returns = returns_to_go(rewards, mask, gamma=gamma, cu_seqlens=cu_seqlens)
    return masked_whiten(returns, mask)


def _min_step(step_rewards: Tensor, is_step: Tensor, mask: Tensor, cu: Tensor | None) -> Tensor:
    rewards, steps = unpack(cu, step_rewards, is_step)
    per_seq = torch.where(steps, rewards, torch.inf).amin(-1)
    per_seq = torch.where(steps.any(-1), per_seq, 0.0)
    return torch.where(mask, to_tokens(per_seq, mask, cu), 0.0)


def _last_step(step_rewards: Tensor, is_step: Tensor, mask: Tensor, cu: Tensor | None) -> Tensor:
    rewards, steps = unpack(cu, step_rewards, is_step)
    positions = torch.arange(steps.shape[1], device=steps.device)
    last = torch.where(steps, positions, 0).amax(-1, keepdim=True)
    per_seq = torch.where(steps.any(-1), rewards.gather(-1, last).squeeze(-1), 0.0)
    return torch.where(mask, to_tokens(per_seq, mask, cu), 0.0)


def _sum_steps(step_rewards: Tensor, is_step: Tensor, mask: Tensor, cu: Tensor | None) -> Tensor:
    return returns_to_go(step_rewards, mask, cu_seqlens=cu)


PROCESS_REDUCTIONS = {"min": _min_step, "last": _last_step, "sum": _sum_steps}


@torch.no_grad()
def process_advantages(
    step_rewards: Tensor,
    step_mask: Tensor,
    mask: Tensor,
    reduction: ProcessReduction,
    *,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Turn step-level (process) rewards into per-token values: `(B, T)` -> `(B, T)`.

    Step k of a sequence has reward r_k in `step_rewards` at its step-end token (where
    `step_mask` is true, e.g. the newline closing a reasoning step), as a process reward model
    scores it; other positions of `step_rewards` are ignored.

    - `"min"`: every unmasked token gets min_k r_k, the solution judged by its worst step
      (the PRM aggregation of Lightman et al. 2023, and Math-Shepherd's verification,
      Wang et al. 2024).
    - `"last"`: every unmasked token gets the last step's reward r_K, the PRM read as an
      outcome reward.
    - `"sum"`: token t gets the return-to-go over steps, the sum of r_k over the steps that
      end at or after t (gamma = 1), as in PRIME (Cui et al. 2025) and DeepSeekMath's process
      supervision (Shao et al. 2024, Sec. 4.1.3). Tokens after the last step end get 0.

    A sequence with no step gets 0 everywhere. Normalize `step_rewards` first (e.g. over the
    group, as DeepSeekMath does) if the method calls for it. Packed: all `(1, N)` plus
    `cu_seqlens`. Masked tokens come back 0.
    """
    try:
        reduce = PROCESS_REDUCTIONS[reduction]
    except KeyError:
        raise ValueError(
            f"unknown process reduction {reduction!r}; expected one of {sorted(PROCESS_REDUCTIONS)}"
        ) from None
    mask = mask.bool()
    is_step = step_mask.bool() & mask
    return reduce(torch.where(is_step, _floating(step_rewards), 0.0), is_step, mask, cu_seqlens)
