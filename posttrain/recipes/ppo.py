"""RLHF with PPO (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022) on the online core.

One step:
1. Draw `prompts_per_step` prompts and sample `samples_per_prompt` completions of each with the
   current policy (`posttrain.online`).
2. Score them: a learned reward model by default, or any reward list (verifiers, ensembles with
   mean - k std). The score lands on each completion's last token, normalised with the first
   step's mean and std (Ziegler et al. 2019, Sec. 2.2), clipped, and lowered by
   `missing_eos_penalty` where sampling cut the completion.
3. The frozen reference's log-probs (the SFT policy; with LoRA, the policy with its adapters
   disabled) and the critic's values V(s_t) of the state before each completion token.
4. Per-token rewards r_t = -beta (log pi_old(y_t) - log pi_ref(y_t)) (InstructGPT eq. 2's KL
   penalty, as per-token k1), plus the score at the last token; GAE (gamma, lambda) gives
   advantages (whitened over the step's tokens) and returns.
5. `epochs` passes over the rollouts in minibatches: each takes one optimizer step of the
   policy on the clipped surrogate (token mean; + gamma_ptx x the mean NLL of `ptx.batch_size`
   SFT sequences: PPO-ptx, InstructGPT eq. 2) and one of the critic on the clipped value loss.
6. beta moves toward `kl_target` from the rollouts' KL per completion (Ziegler et al. 2019).

pi_old is the sampling policy, whose log-probs the sampler returned, as in `posttrain grpo`.
The critic is a separate model with its own optimizer; checkpoints hold both, and the PPO state
(beta, the score statistics), so a killed run resumes exactly.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from posttrain.config import ConfigError
from posttrain.data.packing import Batch, collate
from posttrain.data.prompts import load_prompts
from posttrain.data.splits import load_train_eval
from posttrain.data.tokenize import tokenize_sft, uses_chat_template
from posttrain.eval.heldout import evaluate_prompts, heldout_params
from posttrain.eval.loss import heldout_nll
from posttrain.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)
from posttrain.models.loading import (
    fit_to_context,
    load_model,
    load_tokenizer,
    model_dir,
    save_pretrained,
)
from posttrain.models.logprobs import nll_sum
from posttrain.models.reference import Reference
from posttrain.models.reward import RewardModel, load_reward_model
from posttrain.online import (
    MicroBatch,
    Rollout,
    completion_logprobs,
    draw,
    forward_logprobs,
    micro_batches,
    reference_pass,
    sample_step,
    sampled_metrics,
    sampler_gap,
    shared_pass,
    step_rewards,
    sync_weights,
    task_reward,
    train_share,
    value_pass,
    zero_loss,
)
from posttrain.recipes.ppo_config import PPOConfig, PPOSection
from posttrain.rewards import CompositeReward, build_composite
from posttrain.rollout import build_sampler, sampling_params, tool_schemas
from posttrain.train.learner import Learner, step_indices
from posttrain.train.run import Run

CURVES = ("score", "gold", "kl", "beta", "eval/reward", "eval/gold", "eval/ptx_loss")


@dataclass
class PPOState:
    """What a checkpoint keeps beside the two learners: beta and the score statistics."""

    kl: AdaptiveKLController | FixedKLController
    score_mean: float | None = None
    score_std: float | None = None

    def state_dict(self) -> dict:
        return {"beta": self.kl.value, "score_mean": self.score_mean, "score_std": self.score_std}

    def load_state_dict(self, state: dict) -> None:
        self.kl.value = state["beta"]
        self.score_mean, self.score_std = state["score_mean"], state["score_std"]


def rewards_of(cfg: PPOConfig) -> tuple[CompositeReward, CompositeReward | None]:
    """The reward (the `rewards` list; unset: the reward model, else the task's verifiers) and
    the gold rewards scored for monitoring (`gold`; unset: the task's verifiers when the
    reward is something else)."""
    specs = cfg.rewards
    if specs is None and cfg.reward_model:
        path = model_dir(cfg.reward_model, "reward_model")
        # It reads prompts as the policy does (the chat template or not).
        options = {"path": path, "device": cfg.run.device, "chat_template": cfg.data.chat_template}
        specs = [{"name": "reward_model", "options": options}]
    reward = task_reward(specs, cfg.data, cfg.ray)  # gold stays in this process
    if cfg.gold is not None:
        return reward, build_composite(cfg.gold)
    if cfg.data.task and specs is not None:
        return reward, task_reward(None, cfg.data)
    return reward, None


def shaped_scores(rollouts: list[Rollout], state: PPOState, p: PPOSection) -> torch.Tensor:
    """`(S,)` sequence scores as the policy sees them: normalised with the first step's
    statistics (fixed then), clipped, minus the missing-eos penalty for truncated ones."""
    scores = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    if p.score_norm:
        if state.score_mean is None:  # the starting policy's samples set the scale
            state.score_mean = float(scores.mean())
            state.score_std = max(float(scores.std(correction=0)), 1e-6)
        scores = (scores - state.score_mean) / state.score_std
    if p.score_clip:
        scores = scores.clamp(-p.score_clip, p.score_clip)
    truncated = torch.tensor([r.truncated for r in rollouts], dtype=torch.float32)
    return scores - p.missing_eos_penalty * truncated


def advantages_and_returns(
    rollouts: list[Rollout],
    scores: torch.Tensor,
    beta: float,
    p: PPOSection,
    step_scores: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Set each rollout's `advantages` and `returns` `(T,)` by GAE over r_t = -beta k1_t
    (+ p.process_weight x `step_scores[i]`, each rollout's `(T,)` step scores on the tokens that
    end its steps) (+ the score at the last token); returns the rollout-time KL and value
    statistics."""
    lengths = [len(r.token_ids) for r in rollouts]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    mask = torch.cat([r.completion_mask for r in rollouts])[None]
    values = torch.cat([r.values for r in rollouts])[None]
    k1 = torch.cat([r.old_logprobs - r.ref_logprobs for r in rollouts])[None] * mask
    token_rewards = -beta * k1
    if step_scores is not None:
        token_rewards = token_rewards + p.process_weight * torch.cat(step_scores)[None] * mask
    advantages, returns = gae(
        values, mask, scores=scores, token_rewards=token_rewards, gamma=p.gamma, lam=p.lam,
        cu_seqlens=cu,
    )  # fmt: skip
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    for r, a, g in zip(
        rollouts, advantages[0].split(lengths), returns[0].split(lengths), strict=True
    ):
        r.advantages, r.returns = a, g
    kept = mask.bool()
    residual, target = (returns - values)[kept], returns[kept]
    kl_per_sequence = torch.stack([k.sum() for k in k1[0].split(lengths)])
    return {
        "kl": float(kl_per_sequence.mean()),
        "kl/token": float(k1.sum() / kept.sum()),
        "value/mean": float(values[kept].mean()),
        "returns/mean": float(target.mean()),
        "explained_variance": float(
            1 - residual.var(correction=0) / target.var(correction=0).clamp(min=1e-8)
        ),
    }


def policy_loss(
    model, mb: MicroBatch | Batch, *, total: float, p: PPOSection, ptx: tuple, temperature: float,
    diff: list | None = None,
):  # fmt: skip
    """A minibatch's micro-batch: the clipped surrogate as a token sum (the learner divides by
    the minibatch's completion tokens, `total`), or a ptx batch's gamma x mean NLL scaled so
    that the division leaves it a mean over the ptx tokens."""
    if isinstance(mb, Batch):
        coef, targets = ptx
        nll = nll_sum(model, mb) / targets
        return coef * nll * total, {"ptx/nll": nll.detach() * total}
    logprobs, entropy = completion_logprobs(model, mb, temperature)
    if diff is not None:  # the policy has not moved since sampling: check pi_old's reuse
        diff.append(float(((logprobs.detach() - mb.old_logprobs).abs() * mb.mask).max()))
    loss, m = ppo_policy_loss(
        logprobs, mb.old_logprobs, mb.advantages, mb.mask, clip_eps_low=p.clip_eps,
        agg="token_mean", denominator=1.0,
    )  # fmt: skip
    n = mb.num_tokens
    metrics = {"clip_fraction": m["clip_fraction"] * n, "approx_kl": m["approx_kl"] * n}
    metrics["entropy"] = (entropy * mb.mask).sum()
    return loss, metrics


def critic_loss(critic: RewardModel, mb: MicroBatch, *, p: PPOSection):
    """The clipped value loss of a micro-batch as a token sum."""
    values = critic(mb.batch, per_token=True)[:, 0][None].float()  # forward: DDP syncs
    loss, m = value_loss(
        values, mb.values, mb.returns, mb.mask, clip_eps=p.value_clip_eps, agg="token_mean",
        denominator=1.0,
    )  # fmt: skip
    n = mb.num_tokens
    return loss, {
        "value_clip_fraction": m["value_clip_fraction"] * n,
        "value_error": m["value_error"] * n,
    }


def load_critic(
    cfg: PPOConfig, device: torch.device, pad_token_id: int, vocab: dict
) -> RewardModel:
    """The value model: a sequence classifier with one head, from critic.path, the reward model
    or the policy; it reads the policy's token ids, so it must share the policy's tokenizer."""
    c = cfg.critic
    if c.path:
        path, key = c.path, "critic.path"
    elif c.init == "reward_model":
        path, key = cfg.reward_model, "reward_model"
    else:
        path, key = cfg.model.path, "model.path"
    if load_tokenizer(path, key).get_vocab() != vocab:
        raise ValueError(
            f"{key}: {path!r} has another tokenizer than the policy; the critic reads the "
            "policy's tokens (set critic.init=policy)"
        )
    critic = load_reward_model(
        path, device, heads=["value"], head_weights=[1.0], pad_token_id=pad_token_id,
        dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=c.gradient_checkpointing, lora_r=c.lora.r if c.lora.enabled else 0,
        lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout,
        lora_target_modules=c.lora.target_modules, key=key,
    )  # fmt: skip
    if not critic.last_token:
        raise ValueError(f"{key}: the critic needs a decoder backbone, got an encoder")
    return critic


def run(cfg: PPOConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    p, s, seed = cfg.ppo, cfg.sampling, cfg.run.seed
    run = Run(cfg.run, cfg, curves=CURVES)
    device, dist = run.device, run.dist

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    max_prompt = fit_to_context(
        cfg.data.max_prompt_length, cfg.model.path, "data.max_prompt_length", s.max_new_tokens
    )
    train, held_out = load_prompts(
        cfg.data, tokenizer, chat=chat, max_prompt_length=max_prompt, seed=seed,
        tools=tool_schemas(cfg.environment),
    )  # fmt: skip
    ptx_train, ptx_eval = [], []
    if cfg.ptx.train:
        records = load_train_eval(
            cfg.ptx.train, cfg.ptx.eval, kinds=("completion", "conversation"),
            eval_fraction=cfg.ptx.eval_fraction, seed=seed,
        )  # fmt: skip
        n = cfg.ptx.max_length
        limits = dict(chat=chat, max_length=n, max_prompt_length=n, truncate=True)
        ptx_train = tokenize_sft(tokenizer, records[0], source=cfg.ptx.train, **limits)
        source = cfg.ptx.eval or f"{cfg.ptx.train} (held out)"
        ptx_eval = tokenize_sft(tokenizer, records[1], source=source, **limits)
    reward, gold = rewards_of(cfg)

    policy = load_model(cfg.model, device)
    completions = p.prompts_per_step * p.samples_per_prompt
    minibatch = p.minibatch_size or completions
    updates_per_step = p.epochs * math.ceil(completions / minibatch)
    total_updates = cfg.run.max_steps * updates_per_step
    learner = Learner(policy, run.dist, total_steps=total_updates, **cfg.optim.model_dump())
    frozen = None if cfg.model.lora.enabled else load_model(cfg.model, device, trainable=False)
    reference = Reference(policy, frozen, autocast=learner.autocast)
    critic = load_critic(cfg, device, tokenizer.pad_token_id, tokenizer.get_vocab())
    critic_learner = Learner(
        critic, run.dist, total_steps=total_updates, **cfg.critic.optim.model_dump()
    )
    sampler = build_sampler(s, policy, tokenizer, seed, cfg.environment, chat=chat)
    controller = (
        AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
        if p.kl_target
        else FixedKLController(p.kl_coef)
    )
    state = PPOState(controller)
    run.resume({"policy": learner, "critic": critic_learner}, state)
    eval_params = heldout_params(cfg.evaluation, s, seed)
    nll_kw = dict(micro_batch_size=p.micro_batch_size, packed=True, pad_id=tokenizer.pad_token_id)

    def evaluate() -> dict:
        metrics = {}
        if held_out:
            result = evaluate_prompts(sampler, held_out, reward, eval_params, gold, dist)
            rows = [r.as_row() for r in result.rollouts[: cfg.evaluation.log_samples]]
            run.samples(run.step, rows, name="eval_samples")
            metrics.update(result.metrics)
        if ptx_eval:
            metrics["eval/ptx_loss"] = heldout_nll(policy, ptx_eval, run.dist, **nll_kw)
        return metrics

    run.summary.update(
        train_prompts=len(train), eval_prompts=len(held_out), ptx_sequences=len(ptx_train),
        reference="adapters disabled" if frozen is None else "frozen copy",
    )  # fmt: skip

    def ptx_batches(update: int) -> tuple[list[Batch], int]:
        """The ptx sequences of the run's `update`-th policy step (a pure function of it)."""
        if not cfg.ptx.coef:
            return [], 0
        index = step_indices(
            update, num_examples=len(ptx_train), batch_size=cfg.ptx.batch_size, seed=seed
        )
        batch = collate([ptx_train[k] for k in index], True, tokenizer.pad_token_id).to(device)
        return [batch], batch.num_targets

    try:
        run.begin(evaluate)
        for step in run.steps():
            began = time.perf_counter()
            prompts = draw(train, step, p.prompts_per_step, seed)
            params = sampling_params(s, n=p.samples_per_prompt, seed=seed * 1_000_003 + step)
            # Each process samples and scores its share; all of them get every rollout.
            sampled, metrics = sample_step(sampler, prompts, params, reward, dist, gold=gold)
            times = {"time/sample_s": time.perf_counter() - began}
            rollouts = [r for r in sampled if not r.skipped]  # a failed reward leaves the update
            reference_pass(reference, rollouts, p.micro_batch_size, s.temperature, dist)
            if p.old_logprobs == "recompute" and rollouts:
                old = shared_pass(rollouts, dist, lambda part: forward_logprobs(
                    policy, part, p.micro_batch_size, s.temperature, autocast=learner.autocast
                ))  # fmt: skip
                for r, logprobs in zip(rollouts, old, strict=True):
                    r.old_logprobs = logprobs
                metrics.update(sampler_gap(rollouts))
            times["time/reference_s"] = time.perf_counter() - began - sum(times.values())
            value_pass(
                critic, rollouts, p.micro_batch_size, autocast=critic_learner.autocast, dist=dist
            )
            times["time/values_s"] = time.perf_counter() - began - sum(times.values())
            scores = shaped_scores(rollouts, state, p)
            beta = state.kl.value
            steps = None
            if p.process_weight > 0 and rollouts:
                if not any(r.step_scores for r in rollouts):
                    raise ConfigError(
                        "ppo.process_weight > 0 but no reward scored steps; add a process reward "
                        "model, e.g. rewards: [..., {name: prm, options: {path: runs/prm/final}}]"
                    )
                steps = [step_rewards(r, tokenizer)[0] for r in rollouts]
            if rollouts:
                metrics.update(advantages_and_returns(rollouts, scores, beta, p, steps))
            prepared = time.perf_counter()

            updates, critic_updates, diff = [], [], []
            for epoch in range(p.epochs):
                rng = torch.Generator().manual_seed(seed + 1_000_003 * step + epoch)
                order = [rollouts[i] for i in torch.randperm(len(rollouts), generator=rng).tolist()]
                for i in range(0, len(order), minibatch):
                    # Each process trains on its share; the learners average over all of them.
                    # Every process adds the same ptx batch, weighted by its share of the tokens.
                    part, real = train_share(order[i : i + minibatch], dist)
                    mbs = micro_batches(part, p.micro_batch_size, device)
                    weights = [mb.num_tokens * real for mb in mbs]
                    ptx, ptx_tokens = ptx_batches(step * updates_per_step + len(updates))
                    fn = functools.partial(
                        policy_loss, total=float(sum(weights)), p=p, ptx=(cfg.ptx.coef, ptx_tokens),
                        temperature=s.temperature, diff=None if updates or not real else diff,
                    )  # fmt: skip
                    fn = fn if real else zero_loss(fn)
                    updates.append(learner.step(mbs + ptx, weights + [0] * len(ptx), fn))
                    value_fn = functools.partial(critic_loss, p=p)
                    value_fn = value_fn if real else zero_loss(value_fn)
                    critic_updates.append(critic_learner.step(mbs, weights, value_fn))
            state.kl.update(metrics.get("kl", 0.0), len(rollouts))
            times["time/weight_sync_s"] = sync_weights(sampler, policy)

            metrics.update(sampled_metrics(sampled))
            metrics["score"] = metrics.pop("reward", math.nan)
            metrics["score/shaped"] = float(scores.mean()) if rollouts else math.nan
            metrics["beta"], metrics["next_beta"] = beta, state.kl.value
            for key in updates[0] if updates else []:
                name = "policy_loss" if key == "loss" else key
                metrics[name] = sum(u[key] for u in updates) / len(updates)
            for key in critic_updates[0] if critic_updates else []:
                name = (
                    "value_loss"
                    if key == "loss"
                    else f"critic/{key}"
                    if key in ("grad_norm", "lr")
                    else key
                )
                metrics[name] = sum(u[key] for u in critic_updates) / len(critic_updates)
            diff = dist.all_gather(diff)
            if diff:
                metrics["old_logprob_max_abs_diff"] = max(diff)
            metrics.update(times)
            metrics["time/train_s"] = time.perf_counter() - prepared
            tokens = sum(len(r.token_ids) for r in sampled)
            metrics["completion_tokens_per_s"] = tokens / (time.perf_counter() - began)
            rows = [r.as_row() for r in sampled[: s.log_samples]]
            run.end_step(step + 1, metrics, evaluate, samples=rows)
    finally:
        sampler.close()
    return run.finish(lambda out: save_pretrained(policy, tokenizer, out))
