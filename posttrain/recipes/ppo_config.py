"""The `posttrain ppo` config: every key, with the defaults of InstructGPT / Ziegler et al.
where they apply (docs/ppo.md says where each comes from)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import (
    EnvironmentConfig,
    EvaluationConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RayConfig,
    RunConfig,
    SamplingConfig,
    Section,
)


class PPOSection(Section):
    prompts_per_step: int = Field(64, ge=1)
    """Prompts per step; each gets samples_per_prompt completions."""
    samples_per_prompt: int = Field(1, ge=1)
    """Completions per prompt (PPO needs no group: 1 is the classic setting)."""
    epochs: int = Field(4, ge=1)
    """PPO epochs over each step's rollouts (Ziegler et al. 2019 and TRL: 4)."""
    minibatch_size: int = Field(0, ge=0)
    """Completions per optimizer step (policy and critic alike); 0: all of the step's."""
    micro_batch_size: int = Field(16, ge=1)
    """Completions per forward pass; gradients accumulate over a minibatch."""
    clip_eps: float = Field(0.2, gt=0)
    """The policy ratio is clipped to [1 - clip_eps, 1 + clip_eps] (Schulman et al. 2017)."""
    value_clip_eps: float | None = Field(0.2, gt=0)
    """Value clipping around the rollout-time values (OpenAI baselines' PPO2); null: none."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda (Schulman et al. 2016)."""
    kl_coef: float = Field(0.05, ge=0)
    """beta: the per-token KL penalty -beta * (log pi_old - log pi_ref) in the reward (its
    starting value when kl_target is set)."""
    kl_target: float = Field(0.0, ge=0)
    """Adaptive KL (Ziegler et al. 2019, Sec. 2.2): beta moves so that the rollouts' KL (nats
    per completion, summed over its tokens) approaches this; 0: beta stays fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive KL horizon in completions: beta changes by at most a factor 1 +- 0.2 x
    completions per step / horizon per step."""
    score_norm: bool = True
    """Normalise the sequence score with the mean and std of the first step's scores (the
    starting policy's samples), fixed afterwards (Ziegler et al. 2019, Sec. 2.2)."""
    score_clip: float = Field(0.0, ge=0)
    """Clip the (normalised) score to +- this (0: off)."""
    missing_eos_penalty: float = Field(0.0, ge=0)
    """Subtracted from the score of a completion cut at sampling.max_new_tokens (TRL's name)."""
    process_weight: float = Field(0.0, ge=0)
    """Process rewards (a reward that scores steps, e.g. `prm`): each step's score times this
    weight joins the per-token reward on the token that ends the step, as Math-Shepherd's
    step-by-step PPO (Wang et al. 2024, Sec. 3.4) rewards each step; 0 ignores step scores."""
    whiten_advantages: bool = True
    """Whiten advantages over every completion token of the step."""
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    """pi_old: the sampler's log-probs (free), or one no-grad training forward (for engines
    whose decode numerics differ, e.g. bf16 on GPU)."""


class CriticSection(Section):
    init: Literal["reward_model", "policy"] = "reward_model"
    """Start the critic from the reward model (its backbone and head, as InstructGPT does) or
    from the policy's backbone with a new value head."""
    path: str = ""
    """A model directory to start the critic from instead (a value or reward model)."""
    gradient_checkpointing: bool = False
    """Recompute the critic's activations in its backward pass."""
    lora: LoraConfig = LoraConfig()
    """Train LoRA adapters (and the value head) instead of the whole critic."""
    optim: OptimConfig = OptimConfig(lr=1e-5)
    """The critic's own AdamW and schedule."""


class PtxSection(Section):
    train: str = ""
    """SFT or pretraining records (prompt/completion or conversation): the NLL term's data."""
    eval: str = ""
    """Held-out records whose NLL (eval/ptx_loss) each evaluation reports; empty: a split of
    train. Set train without coef to measure the alignment tax without mixing it in."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of train held out when eval is empty."""
    coef: float = Field(0.0, ge=0)
    """gamma of PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): + gamma x the mean NLL of
    ptx sequences in every policy optimizer step. 0: off."""
    batch_size: int = Field(8, ge=1)
    """ptx sequences per policy optimizer step."""
    max_length: int = Field(512, ge=1)
    """Longest ptx sequence in tokens (longer ones are cut)."""


class PPOConfig(Section):
    model: ModelConfig = ModelConfig()
    """The policy, and its start the frozen reference (with LoRA: adapters disabled)."""
    reward_model: str = ""
    """A reward model trained by `posttrain rm`: the reward (when `rewards` is unset) and the
    critic's start (critic.init=reward_model)."""
    data: PromptDataConfig = PromptDataConfig()
    """Prompts: a task, or prompt files."""
    rewards: list[dict[str, Any]] | None = None
    """Weighted reward functions `{name, weight, fallback, timeout_s, options}`, summed: the
    score placed on each completion's last token. Unset: the reward model, else the task's
    verifiers."""
    gold: list[dict[str, Any]] | None = None
    """Rewards scored for monitoring only (the gold score of Gao et al. 2022: how the policy
    does on what the proxy reward stands for). Unset: the task's verifiers when the reward is
    something else."""
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
    ppo: PPOSection = PPOSection()
    """Batch semantics: a step samples prompts_per_step x samples_per_prompt completions;
    minibatch_size and micro_batch_size count completions."""
    critic: CriticSection = CriticSection()
    """The value model."""
    ptx: PtxSection = PtxSection()
    """PPO-ptx: the SFT (or pretraining) NLL mixed into the policy loss."""
    optim: OptimConfig = OptimConfig(lr=1e-6)
    """The policy's AdamW; schedules span max_steps x epochs x minibatches optimizer steps."""
    run: RunConfig = RunConfig(out_dir="runs/ppo", eval_every=10)
    """Output directory, seed, device, steps (sampling steps), logging, evaluation, checkpoints."""

    @model_validator(mode="after")
    def _critic_has_a_start(self) -> PPOConfig:
        if self.critic.init == "reward_model" and not (self.critic.path or self.reward_model):
            raise ValueError(
                "critic.init=reward_model needs reward_model (or critic.path); set "
                "critic.init=policy to start the critic from the policy"
            )
        if self.ptx.coef and not self.ptx.train:
            raise ValueError("ptx.coef is set but ptx.train names no data")
        return self
