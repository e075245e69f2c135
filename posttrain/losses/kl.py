"""KL divergence to a reference policy: per-token estimators, KL as a reward penalty or as a
loss term, and the KL coefficient controllers.

The estimators follow Schulman, "Approximating KL divergence" (2020). With tokens sampled from
the policy pi and `log_r = logprobs - ref_logprobs` (log pi - log pi_ref), each estimates
KL(pi || pi_ref):

    k1 = log_r                       unbiased, high variance, can be negative
    k2 = 0.5 * log_r^2               biased, low variance, >= 0
    k3 = exp(-log_r) - 1 + log_r     unbiased, low variance, >= 0 (Shao et al. 2024, eq. 4)
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.aggregation import AggMode, aggregate_loss, masked_mean, zero_masked

KLEstimator = Literal["k1", "k2", "k3"]

KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda log_r: log_r,
    "k2": lambda log_r: 0.5 * log_r**2,
    "k3": lambda log_r: torch.exp(-log_r) - 1.0 + log_r,
}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimator = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate, elementwise: any shape, e.g. `(B, T)` -> `(B, T)`.

    No mask: see the module docstring for the formulas. Use `kl_penalty_rewards` or `kl_loss`
    on padded or packed batches.
    """
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return estimator(logprobs - ref_logprobs)


def kl_penalty_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kind: KLEstimator = "k1",
) -> Tensor:
    """KL as a reward penalty (Ziegler et al. 2019, Sec. 2.2; InstructGPT, Ouyang et al. 2022,
    eq. 2): per-token rewards `-kl_coef * kl_t`, 0 at masked tokens, to feed to `gae` as
    `token_rewards`. Returns `(B, T)` (or packed `(1, N)`), no grad.

    k1 is the classic choice here: its sum over a sequence is the sequence's log-ratio.
    """
    mask = mask.bool()
    logprobs, ref_logprobs = zero_masked(mask, logprobs.detach(), ref_logprobs.detach())
    return torch.where(mask, -kl_coef * kl_estimate(logprobs, ref_logprobs, kind), 0.0)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: KLEstimator = "k3",
    agg: AggMode = "token_mean",
    cu_seqlens: Tensor | None = None,
    norm_length: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL as a loss term (GRPO, Shao et al. 2024, eq. 3-4): `aggregate_loss(kl_t, mask, agg)`.

    The recipe multiplies it by its coefficient beta and adds it to the policy loss, using the
    same `agg` as the policy loss. `logprobs` `(B, T)` carry grad; `ref_logprobs` `(B, T)` do
    not. Packed: `(1, N)` plus `cu_seqlens`.

    Metrics: `kl` (mean over unmasked tokens, whatever `agg`).
    """
    mask = mask.bool()
    logprobs, ref_logprobs = zero_masked(mask, logprobs, ref_logprobs)
    token_kl = kl_estimate(logprobs, ref_logprobs, kind)
    loss = aggregate_loss(
        token_kl,
        mask,
        agg,
        cu_seqlens=cu_seqlens,
        norm_length=norm_length,
        denominator=denominator,
    )
    return loss, {"kl": masked_mean(token_kl, mask).detach()}


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2), in the form used by TRL.

        e = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `current_kl` is the measured KL per sequence (summed over its tokens, averaged over the
    batch); `n_steps` is the number of sequences in the batch that measured it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards `target` and return the new value."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class FixedKLController:
    """A constant KL coefficient with `AdaptiveKLController`'s interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
