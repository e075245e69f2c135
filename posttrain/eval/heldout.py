"""The one held-out evaluator of the online recipes and `posttrain arithmetic`: sample completions of
held-out prompts (greedy, or at a temperature), score them with any reward list, and report
accuracy (the first reward scored at least 1), mean reward and a few sample rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.config import EvaluationConfig, SamplingConfig
from posttrain.data.prompts import Prompt
from posttrain.online import Rollout, sample_scored, sampled_metrics
from posttrain.rewards import CompositeReward
from posttrain.rollout import Sampler, SamplingParams
from posttrain.train.distributed import Dist


@dataclass
class HeldOutResult:
    metrics: dict[str, float]
    """`eval/accuracy`, `eval/reward`, `eval/reward/<component>`, `eval/completion_length`,
    `eval/truncated_fraction`; with gold rewards `eval/gold`, `eval/gold/<component>`."""
    rollouts: list[Rollout] = field(repr=False)


def evaluate_prompts(
    sampler: Sampler,
    prompts: Sequence[Prompt],
    reward: CompositeReward,
    params: SamplingParams,
    gold: CompositeReward | None = None,
    dist: Dist | None = None,
) -> HeldOutResult:
    """`params.n` completions of every prompt, scored (and with `gold`, gold-scored); metrics
    are means over them. With `dist`, each process samples its share and all get the result."""
    groups = sample_scored(sampler, prompts, reward, params, gold, dist=dist)
    rollouts = [r for group in groups for r in group]
    metrics = {f"eval/{k}": v for k, v in sampled_metrics(rollouts).items()}
    return HeldOutResult(metrics, rollouts)


def heldout_params(
    evaluation: EvaluationConfig, sampling: SamplingConfig, seed: int
) -> SamplingParams:
    """Greedy (temperature 0), or sampled with the training sampler's truncation, up to the
    same max_new_tokens and stop strings as training; seeded, so each evaluation is repeatable."""
    if evaluation.temperature == 0:
        return SamplingParams.greedy(sampling.max_new_tokens, stop=tuple(sampling.stop))
    return SamplingParams(
        n=evaluation.samples_per_prompt, max_new_tokens=sampling.max_new_tokens,
        temperature=evaluation.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        stop=tuple(sampling.stop), seed=seed,
    )  # fmt: skip
