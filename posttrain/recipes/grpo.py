"""Group-relative online RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++.

One step: draw `prompts_per_step` prompts, sample G completions of each with the current policy,
score them with the weighted reward functions (the online core, `posttrain.online`), turn the
rewards into advantages, and take `epochs x ceil(completions / minibatch_size)` optimizer steps
on the clipped surrogate (Schulman et al. 2017), with an optional KL to a reference. The
algorithms differ only in a few defaults, one entry each in `grpo_config.ALGOS`; docs/grpo.md
says what each computes and where it departs from its paper.

Batch semantics: a step samples `prompts_per_step x group_size` completions.
`minibatch_size` and `micro_batch_size` count completions: one optimizer step sees
`minibatch_size` of them, one forward pass `micro_batch_size`.

pi_old is the sampling policy, whose per-token log-probs the sampler returned, so it costs no
forward pass for any minibatch or epoch of the step; `old_logprobs=recompute` spends one where
engines disagree. Each prompt's tokens are computed once per micro-batch (shared-prompt
packing) and the LM head runs on completion tokens only.
"""

from __future__ import annotations

import functools
import time

import torch

from posttrain.config import ConfigError
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import uses_chat_template
from posttrain.eval.heldout import evaluate_prompts, heldout_params
from posttrain.losses import (
    grpo_advantages,
    kl_estimate,
    kl_loss,
    ppo_policy_loss,
    process_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer, save_pretrained
from posttrain.models.reference import Reference
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
    zero_loss,
)
from posttrain.online.asynchronous import (
    AsyncRollouts,
    behaviour_copy,
    behaviour_weights,
    staleness_steps,
)
from posttrain.recipes.grpo_config import GRPOConfig, GRPOSection
from posttrain.rewards import CompositeReward, build_composite
from posttrain.rollout import build_sampler, sampling_params, tool_schemas
from posttrain.train.learner import Learner
from posttrain.train.run import Run

# curves.png: the reward, the sampled completions' accuracy, and held-out accuracy.
CURVES = ("reward", "accuracy", "eval/accuracy")


def grpo_reward(cfg: GRPOConfig) -> CompositeReward:
    """The configured rewards (or the task's), plus DAPO's soft overlong penalty (Yu et al.
    2025, eq. 13) as the component 'overlong' when `overlong_buffer` is set."""
    g, max_len = cfg.grpo, cfg.sampling.max_new_tokens
    reward = task_reward(cfg.rewards, cfg.data, cfg.ray)
    buffer = int(g.overlong_buffer * max_len)
    if buffer <= 0:
        return reward
    overlong = {
        "name": "overlong",
        "weight": g.overlong_penalty,
        "options": {"max_length": max_len, "cache_length": buffer},
    }
    extra = build_composite([overlong]).components
    return CompositeReward(reward.components + extra)


def process_advantages_of(rollouts: list[Rollout], g: GRPOSection, tokenizer) -> list[torch.Tensor]:
    """Each rollout's `(T_i,)` process advantages: its steps' scores, normalized by the mean
    and std of every step score of its group (DeepSeekMath, Shao et al. 2024, Sec. 4.1.3),
    placed at each step's last token and spread over the tokens by `g.process`."""
    if not any(r.step_scores for r in rollouts):
        raise ConfigError(
            f"grpo.process={g.process!r}: no reward scored steps; add a process reward model, "
            "e.g. rewards: [..., {name: prm, options: {path: runs/prm/final}}]"
        )
    out = []
    for k in range(0, len(rollouts), g.group_size):
        group = rollouts[k : k + g.group_size]
        placed = [step_rewards(r, tokenizer) for r in group]
        values = torch.cat([v[is_step] for v, is_step in placed])
        mean = values.mean() if len(values) else 0.0
        std = values.std(correction=0) if len(values) > 1 else torch.tensor(0.0)
        for r, (v, is_step) in zip(group, placed, strict=True):
            normalized = (v - mean) / (std + 1e-6) if std > 0 else torch.zeros_like(v)
            advantages = process_advantages(
                normalized[None], is_step[None], r.completion_mask[None], g.process
            )
            out.append(g.process_weight * advantages[0])
    return out


def advantages_of(
    rollouts: list[Rollout], trained: list[bool], g: GRPOSection, tokenizer=None
) -> list[torch.Tensor]:
    """Each rollout's `(T_i,)` advantages from its reward (minus beta x k1 KL when the KL is
    in the reward), plus process advantages with `g.process` (which needs the `tokenizer`).
    `rollouts` are whole groups of G, prompt-major; `trained` says which take part in the
    update (REINFORCE++ whitens over their tokens only)."""
    outcome = outcome_advantages(rollouts, trained, g)
    if g.process == "none":
        return outcome
    process = process_advantages_of(rollouts, g, tokenizer)
    return [a + p for a, p in zip(outcome, process, strict=True)]


def outcome_advantages(
    rollouts: list[Rollout], trained: list[bool], g: GRPOSection
) -> list[torch.Tensor]:
    rewards = torch.tensor([r.reward for r in rollouts])
    lengths = [len(r.token_ids) for r in rollouts]
    kl = None
    if g.kl_in == "reward" and g.beta > 0:  # k1 = log pi_old - log pi_ref, per token
        kl = [kl_estimate(r.old_logprobs, r.ref_logprobs, "k1") for r in rollouts]
    if g.advantage == "reinforce_pp":
        mask = torch.cat([r.completion_mask & t for r, t in zip(rollouts, trained, strict=True)])
        advantages = reinforce_plus_plus_advantages(
            rewards,
            mask[None],
            token_rewards=None if kl is None else -g.beta * torch.cat(kl)[None],
            cu_seqlens=torch.tensor([0, *lengths]).cumsum(0),
        )
        return list(advantages[0].split(lengths))
    if kl is not None:  # a sequence-level reward: r - beta * sum_t k1_t
        rewards = rewards - g.beta * torch.stack([k.sum() for k in kl])
    if g.advantage == "rloo":
        per_sequence = rloo_advantages(rewards, g.group_size)
    else:
        per_sequence = grpo_advantages(rewards, g.group_size, scale_by_std=g.scale_by_std)
    return [a.expand(n) for a, n in zip(per_sequence, lengths, strict=True)]


def objective(
    logprobs: torch.Tensor, mb: MicroBatch, g: GRPOSection, max_new_tokens: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss as a *sum* the learner divides by `loss_weight` over the
    minibatch: the clipped surrogate aggregated by `g.aggregation`, plus beta x k3 KL when the
    KL is in the loss. `logprobs` `(1, K)` carry grad. Metrics are token sums."""
    agg = dict(
        agg=g.aggregation,
        cu_seqlens=mb.cu_seqlens,
        norm_length=float(max_new_tokens),
        denominator=1.0,
    )
    loss, m = ppo_policy_loss(
        logprobs,
        mb.old_logprobs,
        mb.advantages,
        mb.mask,
        clip_eps_low=g.clip_eps_low,
        clip_eps_high=g.clip_eps_high,
        **agg,
    )
    metrics = {"clip_fraction": m["clip_fraction"] * mb.num_tokens}
    if mb.ref_logprobs is not None:
        kl, kl_metrics = kl_loss(logprobs, mb.ref_logprobs, mb.mask, kind="k3", **agg)
        metrics["kl"] = kl_metrics["kl"] * mb.num_tokens
        if g.kl_in == "loss":
            loss = loss + g.beta * kl
    return loss, metrics


def loss_weight(mb: MicroBatch, aggregation: str) -> int:
    """What the aggregation averages over: tokens for token_mean, completions otherwise."""
    return mb.num_tokens if aggregation == "token_mean" else mb.num_sequences


def keep_groups(
    kept: list[list[Rollout]], groups: list[list[Rollout]], wanted: int, dynamic: bool
) -> int:
    """Append `groups` to `kept` up to `wanted` groups; under dynamic sampling (DAPO, Yu et
    al. 2025, Sec. 3.2) only groups whose rewards vary. Returns how many did not vary."""
    zero_std = 0
    for group in groups:
        varies = len({r.reward for r in group}) > 1
        zero_std += not varies
        if (varies or not dynamic) and len(kept) < wanted:
            kept.append(group)
    return zero_std


def fill_skipped(group: list[Rollout]) -> None:
    """A completion whose reward failed under the 'skip' fallback is left out of the loss; its
    reward becomes the mean of the others' so that it does not move the group's baseline."""
    ok = [r.reward for r in group if not r.skipped]
    for r in group:
        if r.skipped:
            r.reward = sum(ok) / len(ok) if ok else 0.0


def reweight_stale(rollouts: list[Rollout], trained: list[bool], lag: int, cap: float) -> dict:
    """Decoupled PPO: scale each rollout's advantages by its tokens' behaviour weights
    pi_prox / pi_behaviour, truncated at `cap` (`old_logprobs` holds pi_prox, recomputed;
    `sampler_logprobs` pi_behaviour). Returns the step's staleness metrics over the trained
    policy tokens (their log-prob gap is `sampler_gap`'s); `lag`: optimizer steps between the
    weights that sampled the rollouts and the policy about to train on them."""
    weights = []
    for r, t in zip(rollouts, trained, strict=True):
        w = behaviour_weights(r.old_logprobs, r.sampler_logprobs, cap)
        r.advantages = r.advantages * w
        if t:
            weights.append(w[r.completion_mask])
    if not weights:
        return {"staleness": float(lag)}
    w = torch.cat(weights)
    return {
        "staleness": float(lag),
        "staleness/behaviour_weight": float(w.mean()),
        "staleness/truncated_fraction": float((w >= cap).float().mean()),
    }


def run(cfg: GRPOConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    g, s = cfg.grpo, cfg.sampling
    G, P, seed = g.group_size, g.prompts_per_step, cfg.run.seed
    run = Run(cfg.run, cfg, curves=CURVES)
    dist = run.dist

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    max_prompt = fit_to_context(
        cfg.data.max_prompt_length, cfg.model.path, "data.max_prompt_length", s.max_new_tokens
    )
    train, held_out = load_prompts(
        cfg.data, tokenizer, chat=chat, max_prompt_length=max_prompt, seed=seed,
        tools=tool_schemas(cfg.environment),
    )  # fmt: skip
    reward = grpo_reward(cfg)
    model = load_model(cfg.model, run.device)
    minibatch = g.minibatch_size or P * G
    updates_per_step = g.epochs * -(-P * G // minibatch)  # at most (dynamic sampling: fewer)
    optimizer_steps = cfg.run.max_steps * updates_per_step
    lag = staleness_steps(g.max_staleness, updates_per_step)
    if lag and (dist.world_size > 1 or s.engine != "builtin"):
        raise ConfigError(
            "grpo.max_staleness > 0 (asynchronous rollouts) runs in one process with the "
            "built-in sampler for now; start it without torchrun and with sampling.engine="
            "builtin, or set grpo.max_staleness=0"
        )
    learner = Learner(model, run.dist, total_steps=optimizer_steps, **cfg.optim.model_dump())
    reference = frozen = None  # beta = 0 loads none; LoRA: the policy with adapters disabled
    if g.beta > 0:
        frozen = (
            None if cfg.model.lora.enabled else load_model(cfg.model, run.device, trainable=False)
        )
        reference = Reference(model, frozen, autocast=learner.autocast)
    sampler = build_sampler(s, model, tokenizer, seed, cfg.environment, chat=chat)
    run.resume({"policy": learner})
    eval_params = heldout_params(cfg.evaluation, s, seed)

    def evaluate() -> dict:
        if not held_out:
            return {}
        result = evaluate_prompts(sampler, held_out, reward, eval_params, dist=dist)
        rows = [r.as_row() for r in result.rollouts[: cfg.evaluation.log_samples]]
        run.samples(run.step, rows, name="eval_samples")
        return result.metrics

    def collect(step: int, sampler=sampler) -> tuple[list[list[Rollout]], list[Rollout], dict]:
        """This step's groups (P of them, or under dynamic sampling those whose rewards vary,
        refilled for at most max_sampling_rounds rounds), every rollout sampled, and stats."""
        kept: list[list[Rollout]] = []
        every: list[Rollout] = []
        seen = zero_std = 0
        metrics: dict = {}
        for rounds in range(1, (g.max_sampling_rounds if g.dynamic_sampling else 1) + 1):
            # Prompts and sampler seed are functions of (step, round): resume samples the same.
            # Round 1 reads the seeded epoch order; refills read a second seeded stream.
            at = step if rounds == 1 else step * g.max_sampling_rounds + rounds
            prompts = draw(train, at, P, seed + (7919 if rounds > 1 else 0))
            params = sampling_params(s, n=G, seed=(seed * 1_000_003 + step) * 64 + rounds)
            rollouts, reward_metrics = sample_step(sampler, prompts, params, reward, dist, seen)
            metrics.update(reward_metrics)
            groups = [rollouts[k * G : (k + 1) * G] for k in range(len(prompts))]
            every += rollouts
            for group in groups:
                fill_skipped(group)
            zero_std += keep_groups(kept, groups, P, g.dynamic_sampling)
            seen += len(groups)
            if len(kept) == P:
                break
        metrics.update(
            {"groups/zero_std_fraction": zero_std / seen, "groups/kept": len(kept),
             "groups/sampled": seen}
        )  # fmt: skip
        return kept, every, metrics

    def loss_fn(model, mb: MicroBatch, scale: float, diff: list | None) -> tuple:
        logprobs, entropy = completion_logprobs(model, mb, s.temperature)
        if diff is not None:  # the policy has not moved since sampling: check the reuse
            diff.append(float(((logprobs.detach() - mb.old_logprobs).abs() * mb.mask).max()))
        loss, metrics = objective(logprobs, mb, g, s.max_new_tokens)
        metrics["entropy"] = (entropy * mb.mask).sum()
        # The learner divides metric sums by the minibatch's weight; `scale` makes token means.
        return loss, {k: v * scale for k, v in metrics.items()}

    run.summary.update(
        train_prompts=len(train), eval_prompts=len(held_out),
        reference="none" if reference is None else "adapters disabled" if frozen is None else "frozen copy",
    )  # fmt: skip

    def train_step(step: int, pipeline: AsyncRollouts | None, done_updates: dict) -> None:
        began = time.perf_counter()
        if pipeline is None:
            (groups, sampled_all, metrics), version = collect(step), step
        else:
            (groups, sampled_all, metrics), version = pipeline.get(step)
        rollouts = [r for group in groups for r in group]
        sampled = time.perf_counter()
        if reference is not None:
            reference_pass(reference, rollouts, g.micro_batch_size, s.temperature, dist)
        if (g.old_logprobs == "recompute" or pipeline is not None) and rollouts:
            old = shared_pass(rollouts, dist, lambda part: forward_logprobs(
                model, part, g.micro_batch_size, s.temperature, autocast=learner.autocast
            ))  # fmt: skip
            for r, logprobs in zip(rollouts, old, strict=True):
                r.old_logprobs = logprobs
            metrics.update(sampler_gap(rollouts))
        # Failed rewards, and truncated completions under overlong filtering, leave the loss.
        trained = [not (r.skipped or (g.overlong_filter and r.truncated)) for r in rollouts]
        if rollouts:
            advantages = advantages_of(rollouts, trained, g, tokenizer)
            for r, a in zip(rollouts, advantages, strict=True):
                r.advantages = a
        if pipeline is not None:  # decoupled PPO: stale tokens weighted by pi_prox / pi_behaviour
            lag_now = done_updates[step] - done_updates[version]
            if lag_now > g.max_staleness:  # never: the thread samples no further ahead
                raise RuntimeError(f"step {step}: rollouts {lag_now} optimizer steps stale")
            metrics.update(reweight_stale(rollouts, trained, lag_now, g.max_behaviour_weight))
        updated = time.perf_counter()
        updates: list[dict] = []
        diff: list[float] = []
        for epoch in range(g.epochs):
            order = range(len(groups))
            if epoch:  # later epochs visit the groups in a seeded shuffled order
                rng = torch.Generator().manual_seed(seed + 1_000_003 * step + epoch)
                order = torch.randperm(len(groups), generator=rng).tolist()
            keep = {id(r) for r, t in zip(rollouts, trained, strict=True) if t}
            batch = [r for k in order for r in groups[k] if id(r) in keep]
            for i in range(0, len(batch), minibatch):
                # Each process trains on its share; the learner averages over all of them.
                part, real = train_share(batch[i : i + minibatch], dist)
                mbs = micro_batches(part, g.micro_batch_size, run.device)
                weights = [loss_weight(mb, g.aggregation) * real for mb in mbs]
                scale = sum(weights) / max(sum(mb.num_tokens for mb in mbs), 1)
                check = diff if epoch == 0 and i == 0 and real else None
                fn = functools.partial(loss_fn, scale=scale, diff=check)
                updates.append(learner.step(mbs, weights, fn if real else zero_loss(fn)))
        metrics.update(sampled_metrics(sampled_all))
        metrics["optimizer_steps"] = len(updates)
        for key in updates[0] if updates else []:
            metrics[key] = sum(u[key] for u in updates) / len(updates)
        diff = dist.all_gather(diff)
        if diff:
            metrics["old_logprob_max_abs_diff"] = max(diff)
        metrics["time/sample_s"] = sampled - began
        metrics["time/reference_s"] = updated - sampled
        metrics["time/train_s"] = time.perf_counter() - updated
        tokens = sum(len(r.token_ids) for r in sampled_all)
        metrics["completion_tokens_per_s"] = tokens / (time.perf_counter() - began)
        done_updates[step + 1] = done_updates[step] + len(updates)
        metrics["time/weight_sync_s"] = sync_weights(sampler, model)
        if pipeline is not None:  # the weights after this step, for the thread to sample with
            pipeline.publish(step + 1)
        rows = [r.as_row() for r in sampled_all[: s.log_samples]]
        run.end_step(step + 1, metrics, evaluate, samples=rows)

    pipeline = None  # asynchronous rollouts: a thread samples ahead with a behaviour copy
    done_updates = {run.start: 0}  # optimizer steps taken before each step (since the start)
    try:
        run.begin(evaluate)
        if lag:
            behaviour = behaviour_copy(model)
            ahead = build_sampler(s, behaviour, tokenizer, seed, cfg.environment, chat=chat)
            produce = functools.partial(collect, sampler=ahead)
            pipeline = AsyncRollouts(produce, model, behaviour, lag, run.steps())
        for step in run.steps():
            train_step(step, pipeline, done_updates)
    finally:
        if pipeline is not None:
            pipeline.close()
        sampler.close()
    return run.finish(lambda out: save_pretrained(model, tokenizer, out))
