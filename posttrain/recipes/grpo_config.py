"""The `posttrain grpo` config: what distinguishes the algorithms (`ALGOS`) and every key.

Each algorithm is a set of defaults for the `grpo.*` keys; a key the user sets wins, and
`--dry-run` prints the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import (
    EnvironmentConfig,
    EvaluationConfig,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RayConfig,
    RunConfig,
    SamplingConfig,
    Section,
)
from posttrain.losses import AggMode


@dataclass(frozen=True)
class Algo:
    advantage: Literal["grpo", "rloo", "reinforce_pp"]
    scale_by_std: bool
    aggregation: AggMode
    clip_eps_low: float
    clip_eps_high: float
    beta: float
    kl_in: Literal["loss", "reward"]
    dynamic_sampling: bool
    overlong_buffer: float


# What distinguishes the algorithms; each field is the default of the `grpo.*` key of that name.
ALGOS: dict[str, Algo] = {
    # Shao et al. 2024, eq. 3: std-scaled group advantages, per-sequence token means, k3 KL
    # to the reference inside the loss with beta = 0.04.
    "grpo": Algo("grpo", True, "seq_mean_token_mean", 0.2, 0.2, 0.04, "loss", False, 0.0),
    # Liu et al. 2025: no std scaling, token sums over a constant length, no KL term.
    "dr_grpo": Algo("grpo", False, "seq_mean_token_sum_norm", 0.2, 0.2, 0.0, "loss", False, 0.0),
    # Yu et al. 2025: clip-higher, token-level mean, dynamic sampling, soft overlong penalty.
    "dapo": Algo("grpo", True, "token_mean", 0.2, 0.28, 0.0, "loss", True, 0.2),
    # Ahmadian et al. 2024: leave-one-out baseline, sequence-level loss, k1 KL in the reward.
    "rloo": Algo("rloo", False, "seq_mean_token_sum_norm", 0.2, 0.2, 0.05, "reward", False, 0.0),
    # Hu 2025: per-token k1 KL in the reward, returns whitened over the batch, token mean.
    "reinforce_pp": Algo("reinforce_pp", False, "token_mean", 0.2, 0.2, 0.01, "reward", False, 0.0),
}


class GRPOSection(Section):
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts per step: a step samples prompts_per_step x group_size completions."""
    epochs: int = Field(1, ge=1)
    """mu: passes over each step's completions; pi_old stays the sampling policy throughout."""
    minibatch_size: int = Field(0, ge=0)
    """Completions per optimizer step; 0: all of the step's (one optimizer step per epoch)."""
    micro_batch_size: int = Field(16, ge=1)
    """Completions per forward pass; gradients accumulate over a minibatch."""
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    """pi_old: the sampler's logprobs (free), or one no-grad training forward before the
    updates (for engines whose decode numerics differ, e.g. bf16 on GPU)."""
    max_staleness: int = Field(0, ge=0)
    """Asynchronous rollouts: sample the next steps while this one trains, with weights at
    most this many optimizer steps older than the policy that trains on them (whole sampling
    steps of them: with 2 optimizer steps a step, 3 means a lag of 1 step). 0: synchronous.
    Stale rollouts train by decoupled PPO (pi_old recomputed as the proximal policy, each
    token weighted by pi_prox / pi_behaviour); docs/scaling.md."""
    max_behaviour_weight: float = Field(5.0, gt=0)
    """Decoupled PPO: the per-token weights pi_prox / pi_behaviour are truncated here."""
    advantage: Literal["grpo", "rloo", "reinforce_pp"] | None = None
    """Advantage estimator (unset: the algo's)."""
    scale_by_std: bool | None = None
    """Divide GRPO advantages by the group's reward std."""
    aggregation: AggMode | None = None
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (norm: max_new_tokens)."""
    clip_eps_low: float | None = None
    """The ratio is clipped below at 1 - clip_eps_low."""
    clip_eps_high: float | None = None
    """... and above at 1 + clip_eps_high (clip-higher when larger than clip_eps_low)."""
    beta: float | None = None
    """KL coefficient to the reference; 0 loads no reference at all."""
    kl_in: Literal["loss", "reward"] | None = None
    """'loss': + beta x k3 KL in the loss; 'reward': - beta x k1 KL in the rewards."""
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards all agree and sample more prompts to refill the step."""
    max_sampling_rounds: int = Field(4, ge=1)
    """Dynamic sampling: at most this many sampling rounds per step, then train on what is kept."""
    overlong_filter: bool = False
    """Mask truncated completions out of the loss."""
    overlong_buffer: float | None = Field(None, ge=0, lt=1)
    """DAPO soft overlong penalty: completions longer than (1 - this) x
    sampling.max_new_tokens lose reward linearly, down to -overlong_penalty at max_new_tokens
    (0: off). It joins the rewards as the component 'overlong'."""
    overlong_penalty: float = 1.0
    """Largest overlong penalty."""
    process: Literal["none", "sum", "min", "last"] = "none"
    """Process rewards (a reward that scores steps, e.g. `prm`): each group's step scores are
    normalized over the group and reach the tokens by `losses.process_advantages` ('sum':
    the return-to-go over later steps, DeepSeekMath Sec. 4.1.3), added to the outcome
    advantages; 'none' ignores step scores."""
    process_weight: float = 1.0
    """Weight of the process advantages beside the outcome advantages."""

    def resolved(self, algo: str) -> GRPOSection:
        """Unset keys filled with `ALGOS[algo]`'s defaults."""
        defaults = {k: v for k, v in ALGOS[algo].__dict__.items() if getattr(self, k) is None}
        return self.model_copy(update=defaults)


class GRPOConfig(Section):
    algo: Literal["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"] = "grpo"
    """Whose defaults fill the `grpo.*` keys left unset (see docs/grpo.md)."""
    model: ModelConfig = ModelConfig()
    """The policy; with beta > 0 also the reference (a frozen copy, or with LoRA the same model
    with its adapters disabled)."""
    data: PromptDataConfig = PromptDataConfig()
    """Prompts: a task, or prompt files."""
    rewards: list[dict[str, Any]] | None = None
    """Weighted reward functions `{name, weight, fallback, timeout_s, options}`, summed
    (unset: the task's own verifiers). The first decides `accuracy`: a completion is correct
    when it scores at least 1 there."""
    sampling: SamplingConfig = SamplingConfig()
    """The rollout engine and how completions are sampled."""
    environment: EnvironmentConfig = EnvironmentConfig()
    """Multi-turn rollouts with tools or an environment of your own (docs/tools.md); tokens
    the environment wrote leave every loss and KL."""
    ray: RayConfig = RayConfig()
    """Ray: reward functions scored in actors (`reward_workers`) on a local or existing
    cluster (`address`); docs/scaling.md."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out evaluation (greedy by default) every run.eval_every steps."""
    grpo: GRPOSection = GRPOSection()
    """Batch semantics: a step samples prompts_per_step x group_size completions;
    minibatch_size and micro_batch_size count completions (per optimizer step, per forward)."""
    optim: OptimConfig = OptimConfig(lr=1e-6)
    """AdamW; the schedule spans max_steps x epochs x minibatches optimizer steps."""
    run: RunConfig = RunConfig(out_dir="runs/grpo", eval_every=10)
    """Output directory, seed, device, steps (sampling steps), logging, evaluation, checkpoints."""

    @model_validator(mode="after")
    def _resolve_algo(self) -> GRPOConfig:
        self.grpo = self.grpo.resolved(self.algo)  # so --dry-run prints what will run
        return self
