"""The mathematics of every method as pure functions of tensors.

Losses return `(loss, metrics)`; advantages, KL estimates and whitening return tensors. No
models, configs or trainers here. See docs/losses.md.
"""

from posttrain.losses.advantages import (
    gae,
    grpo_advantages,
    masked_whiten,
    process_advantages,
    reinforce_plus_plus_advantages,
    returns_to_go,
    rloo_advantages,
    score_at_last_token,
)
from posttrain.losses.aggregation import (
    AGGREGATIONS,
    AggMode,
    aggregate_loss,
    masked_mean,
    pack,
    seq_count,
    seq_mean,
    seq_sum,
    to_tokens,
    unpack,
)
from posttrain.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    kl_estimate,
    kl_loss,
    kl_penalty_rewards,
)
from posttrain.losses.policy import (
    entropy_from_logits,
    ppo_policy_loss,
    token_entropy,
    value_loss,
)
from posttrain.losses.preference import (
    PAIR_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    pair_loss,
    robust_dpo_loss,
    simpo_loss,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PAIR_LOSSES",
    "AdaptiveKLController",
    "AggMode",
    "FixedKLController",
    "KLEstimator",
    "aggregate_loss",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "hinge_loss",
    "ipo_loss",
    "kl_estimate",
    "kl_loss",
    "kl_penalty_rewards",
    "kto_loss",
    "masked_mean",
    "masked_whiten",
    "orpo_loss",
    "pack",
    "pair_loss",
    "ppo_policy_loss",
    "process_advantages",
    "reinforce_plus_plus_advantages",
    "returns_to_go",
    "rloo_advantages",
    "robust_dpo_loss",
    "score_at_last_token",
    "seq_count",
    "seq_mean",
    "seq_sum",
    "simpo_loss",
    "to_tokens",
    "token_entropy",
    "unpack",
    "value_loss",
]
