"""The online core every online recipe shares (see `rollouts.py`)."""

from posttrain.online.rollouts import (
    TOKEN_FIELDS,
    MicroBatch,
    Rollout,
    completion_logprobs,
    draw,
    forward_logprobs,
    micro_batches,
    reference_pass,
    sample,
    sample_groups,
    sampled_metrics,
    score,
    task_reward,
    value_pass,
)

__all__ = [
    "TOKEN_FIELDS",
    "MicroBatch",
    "Rollout",
    "completion_logprobs",
    "draw",
    "forward_logprobs",
    "micro_batches",
    "reference_pass",
    "sample",
    "sample_groups",
    "sampled_metrics",
    "score",
    "task_reward",
    "value_pass",
]
