"""Group-relative online RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++.

One step: draw `prompts_per_step` prompts, sample G completions of each with the current policy
(`HFSampler`: each prompt is prefilled once and its G samples share the KV cache), score them
with the weighted reward functions, turn the rewards into advantages, and take
`epochs x ceil(completions / minibatch_size)` optimizer steps on the clipped surrogate
(Schulman et al. 2017), with an optional KL to a reference. The algorithms differ only in a few
defaults, one entry each in `grpo_config.ALGOS` (the config lives there); docs/grpo.md says what
each computes and where it departs from its paper.

Batch semantics: a step samples `prompts_per_step x group_size` completions.
`minibatch_size` and `micro_batch_size` count completions: one optimizer step sees
`minibatch_size` of them, one forward pass `micro_batch_size`.

Training forward: the completions of one prompt are packed with `pack_shared`, so the prompt's
tokens are computed once per micro-batch (the gradient flows through its keys and values), and
the LM head runs on completion tokens only. pi_old is the sampling policy, whose per-token
logprobs the sampler returned: log_softmax(logits / T), the quantity the training forward
computes (tests check they agree within 1e-5 in fp32). So pi_old costs no forward pass, for any
minibatch or epoch of the step; `old_logprobs=recompute` spends one where engines disagree.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import dump_config
from posttrain.data.packing import Batch, pack_shared
from posttrain.data.tokenize import TokenizedExample, prompt_ids, uses_chat_template
from posttrain.eval.curves import plot_curves
from posttrain.losses import (
    grpo_advantages,
    kl_estimate,
    kl_loss,
    ppo_policy_loss,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    token_entropy,
)
from posttrain.models.loading import load_causal_lm, load_tokenizer, save_pretrained
from posttrain.models.logprobs import target_logits
from posttrain.recipes.grpo_config import GRPOConfig, GRPOSection
from posttrain.recipes.grpo_inputs import Scorer, load_prompt_rows
from posttrain.rewards.length import OverlongPenalty
from posttrain.rollout import HFSampler, SamplingParams
from posttrain.train.checkpoint import seed_all
from posttrain.train.distributed import init_distributed
from posttrain.train.learner import Learner, step_indices
from posttrain.train.metrics import MetricsLogger
from posttrain.train.samples import SampleLog

# curves.png: the reward, the sampled completions' accuracy, and held-out greedy accuracy.
CURVES = ("reward", "accuracy", "eval/accuracy")


def overlong_penalty(lengths: list[int], max_len: int, buffer: int, scale: float) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of token counts, times `scale`:
    0 up to max_len - buffer, then linear down to -scale at max_len (0 everywhere if no buffer)."""
    if buffer <= 0:
        return [0.0] * len(lengths)
    penalty = OverlongPenalty(max_length=max_len, cache_length=buffer).penalty
    return [scale * penalty(n) for n in lengths]


@dataclass
class MicroBatch:
    batch: Batch  # the completions, each prompt's tokens once (pack_shared)
    old_logprobs: torch.Tensor  # (1, K) over the K completion tokens
    ref_logprobs: torch.Tensor | None  # (1, K)
    advantages: torch.Tensor | None  # (1, K); None in no-grad passes before advantages exist
    cu_seqlens: torch.Tensor  # (S + 1,): completion s owns tokens cu[s]:cu[s + 1] of K

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def to(self, device: torch.device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MicroBatch(self.batch.to(device), *(move(getattr(self, k)) for k in _TENSORS))


_TENSORS = ("old_logprobs", "ref_logprobs", "advantages", "cu_seqlens")


def micro_batches(samples: list[dict], size: int, device: torch.device) -> list[MicroBatch]:
    """`size` consecutive completions at a time; consecutive ones of a prompt share its tokens."""
    out = []
    for chunk in (samples[i : i + size] for i in range(0, len(samples), size)):
        groups: list[tuple[list[int], list[TokenizedExample]]] = []
        for s in chunk:
            if not groups or groups[-1][0] is not s["prompt_ids"]:
                groups.append((s["prompt_ids"], []))
            groups[-1][1].append(TokenizedExample(s["tokens"], [True] * len(s["tokens"])))
        cat = {
            key: None if chunk[0][key] is None else torch.cat([s[key] for s in chunk])[None]
            for key in ("old_logprobs", "ref_logprobs", "advantages")
        }
        cu = torch.tensor([0] + [len(s["tokens"]) for s in chunk]).cumsum(0)
        out.append(MicroBatch(pack_shared(groups), **cat, cu_seqlens=cu).to(device))
    return out


def completion_logprobs(
    model: torch.nn.Module, mb: MicroBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(1, K)` logprobs of the completion tokens under log_softmax(logits / temperature), and
    the `(1, K)` entropies of those distributions (no grad): the LM head runs on these K only."""
    logits, targets = target_logits(model, mb.batch)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logprobs = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(1)
    with torch.no_grad():
        entropy = token_entropy(logits)
    return logprobs[None], entropy[None]


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module, samples: list[dict], size: int, temperature: float
) -> list[torch.Tensor]:
    """Each completion's `(T_i,)` logprobs from a no-grad training forward in eval mode."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    logprobs = [
        completion_logprobs(model, mb, temperature)[0][0].cpu()
        for mb in micro_batches(samples, size, device)
    ]
    model.train(was_training)
    return list(torch.cat(logprobs).split([len(s["tokens"]) for s in samples]))


def advantages_of(samples: list[dict], g: GRPOSection) -> list[torch.Tensor]:
    """Each completion's `(T_i,)` advantages from its reward (minus beta x k1 KL when the KL
    is in the reward). `samples` are whole groups of G, prompt-major."""
    rewards = torch.tensor([s["reward"] for s in samples])
    lengths = [len(s["tokens"]) for s in samples]
    kl = None
    if g.kl_in == "reward" and g.beta > 0:  # k1 = log pi_old - log pi_ref, per token
        kl = [kl_estimate(s["old_logprobs"], s["ref_logprobs"], "k1") for s in samples]
    if g.advantage == "reinforce_pp":
        trained = torch.tensor([s["trained"] for s in samples])
        mask = trained.repeat_interleave(torch.tensor(lengths))[None]
        advantages = reinforce_plus_plus_advantages(
            rewards,
            mask,
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
    logprobs: torch.Tensor, mb: MicroBatch, g: GRPOSection
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss as a *sum* the learner divides by `loss_weight` over the
    minibatch: the clipped surrogate aggregated by `g.aggregation`, plus beta x k3 KL when the
    KL is in the loss. `logprobs` `(1, K)` carry grad. Metrics are token sums."""
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    agg = dict(
        agg=g.aggregation,
        cu_seqlens=mb.cu_seqlens,
        norm_length=float(g.max_new_tokens),
        denominator=1.0,
    )
    loss, m = ppo_policy_loss(
        logprobs,
        mb.old_logprobs,
        mb.advantages,
        mask,
        clip_eps_low=g.clip_eps_low,
        clip_eps_high=g.clip_eps_high,
        **agg,
    )
    metrics = {"clip_fraction": m["clip_fraction"] * mb.num_tokens}
    if mb.ref_logprobs is not None:
        kl, kl_metrics = kl_loss(logprobs, mb.ref_logprobs, mask, kind="k3", **agg)
        metrics["kl"] = kl_metrics["kl"] * mb.num_tokens
        if g.kl_in == "loss":
            loss = loss + g.beta * kl
    return loss, metrics


def loss_weight(mb: MicroBatch, aggregation: str) -> int:
    """What the aggregation averages over: tokens for token_mean, completions otherwise."""
    return mb.num_tokens if aggregation == "token_mean" else len(mb.cu_seqlens) - 1


def keep_groups(
    kept: list[list[dict]], groups: list[list[dict]], wanted: int, dynamic: bool
) -> int:
    """Append `groups` to `kept` up to `wanted` groups; under dynamic sampling (DAPO, Yu et
    al. 2025, Sec. 3.2) only groups whose rewards vary. Returns how many did not vary."""
    zero_std = 0
    for group in groups:
        varies = len({s["reward"] for s in group}) > 1
        zero_std += not varies
        if (varies or not dynamic) and len(kept) < wanted:
            kept.append(group)
    return zero_std


def run(cfg: GRPOConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    dist = init_distributed(cfg.run.device)
    if dist.world_size > 1:
        raise NotImplementedError("posttrain grpo runs in one process; start it without torchrun")
    g, r, device = cfg.grpo, cfg.run, dist.device
    G, P = g.group_size, g.prompts_per_step
    seed_all(r.seed)
    out = Path(r.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    train_rows, eval_rows = load_prompt_rows(cfg.data, seed=r.seed)
    for row in train_rows + eval_rows:
        row["_ids"] = prompt_ids(tokenizer, row["prompt"], chat)
    scorer = Scorer(cfg.rewards)
    lora, m = cfg.model.lora, cfg.model
    load = dict(dtype=m.dtype, attn_implementation=m.attn_implementation)
    model = load_causal_lm(
        m.path, device, **load, gradient_checkpointing=m.gradient_checkpointing,
        lora_r=lora.r if lora.enabled else 0, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
    )  # fmt: skip
    reference = None  # beta = 0 loads none; with LoRA it is the policy with adapters disabled
    if g.beta > 0 and not lora.enabled:
        reference = load_causal_lm(m.path, device, **load).requires_grad_(False)
    sampler = HFSampler(model, tokenizer, seed=r.seed)
    minibatch = g.minibatch_size or P * G
    optimizer_steps = r.max_steps * g.epochs * math.ceil(P * G / minibatch)
    learner = Learner(model, dist, total_steps=optimizer_steps, **cfg.optim.model_dump())
    start = learner.resume(out) if r.resume else 0
    logger = MetricsLogger(
        out, enabled=True, total_steps=r.max_steps, start_step=start, progress=r.progress,
        tensorboard=r.tensorboard,
    )  # fmt: skip
    sample_log = SampleLog(out / "samples.jsonl", start_step=start, console=r.progress)
    stop = tuple(g.stop)
    buffer = int(g.overlong_buffer * g.max_new_tokens)

    def score(rows: list[dict], completions: list) -> list[dict]:
        """One dict per completion, in order: what it is, its reward, components, correctness."""
        per_row = [rows[c.prompt_index] for c in completions]
        lengths = [len(c.token_ids) for c in completions]
        scored = scorer(per_row, [c.text for c in completions], lengths)
        shaping = overlong_penalty(lengths, g.max_new_tokens, buffer, g.overlong_penalty)
        for s, c, row, penalty in zip(scored, completions, per_row, shaping, strict=True):
            s.update(row=row, prompt_ids=row["_ids"], tokens=c.token_ids, text=c.text,
                     finish=c.finish_reason, old_logprobs=torch.tensor(c.logprobs),
                     ref_logprobs=None, advantages=None)  # fmt: skip
            if buffer:
                s["components"]["overlong"] = penalty
                s["reward"] += penalty
        return scored

    def evaluate() -> float:
        """Held-out accuracy of greedy completions, judged by the first reward."""
        correct = []
        for i in range(0, len(eval_rows), 256):
            rows = eval_rows[i : i + 256]
            batch = sampler.generate(
                [x["_ids"] for x in rows], SamplingParams.greedy(g.max_new_tokens, stop=stop)
            )
            correct += [s["correct"] for s in score(rows, batch.completions)]
        return sum(correct) / max(len(correct), 1)

    def sample(step: int) -> tuple[list[list[dict]], list[dict], dict]:
        """This step's groups (P of them, or under dynamic sampling those whose rewards vary,
        refilled for at most max_sampling_rounds rounds), every completion sampled, and stats."""
        kept: list[list[dict]] = []
        every: list[dict] = []
        seen = zero_std = 0
        for rounds in range(1, (g.max_sampling_rounds if g.dynamic_sampling else 1) + 1):
            # Prompts and sampler seed are functions of (step, round): resume samples the same.
            # Round 1 reads the seeded epoch order; refills read a second seeded stream.
            at = step if rounds == 1 else step * g.max_sampling_rounds + rounds
            stream = r.seed + (7919 if rounds > 1 else 0)
            index = step_indices(at, num_examples=len(train_rows), batch_size=P, seed=stream)
            rows = [train_rows[i] for i in index]
            params = SamplingParams(
                n=G, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                top_k=g.top_k, stop=stop, seed=(r.seed * 1_000_003 + step) * 64 + rounds,
            )  # fmt: skip
            scored = score(rows, sampler.generate([x["_ids"] for x in rows], params).completions)
            groups = [scored[k * G : (k + 1) * G] for k in range(len(rows))]
            every += scored
            for group in groups:
                _fill_skipped(group)
            zero_std += keep_groups(kept, groups, P, g.dynamic_sampling)
            seen += len(groups)
            if len(kept) == P:
                break
        return (
            kept,
            every,
            {
                "groups/zero_std_fraction": zero_std / seen,
                "groups/kept": len(kept),
                "groups/sampled": seen,
            },
        )

    def loss_fn(model, mb: MicroBatch, scale: float, diff: list | None) -> tuple:
        logprobs, entropy = completion_logprobs(model, mb, g.temperature)
        if diff is not None:  # the policy has not moved since sampling: check the reuse
            diff.append(float((logprobs.detach() - mb.old_logprobs).abs().max()))
        loss, metrics = objective(logprobs, mb, g)
        metrics["entropy"] = entropy.sum()
        # The learner divides metric sums by the minibatch's weight; `scale` makes token means.
        return loss, {k: v * scale for k, v in metrics.items()}

    summary: dict = {"train_prompts": len(train_rows), "eval_prompts": len(eval_rows)}
    summary["reference"] = "adapters disabled" if reference is None and g.beta > 0 else (
        "frozen copy" if reference is not None else "none"
    )  # fmt: skip
    if start == 0 and eval_rows:
        summary["accuracy_before"] = evaluate()
        logger.log(0, {"eval/accuracy": summary["accuracy_before"]})
    for step in range(start, r.max_steps):
        began = time.perf_counter()
        groups, sampled_all, metrics = sample(step)
        samples = [s for group in groups for s in group]
        sampled = time.perf_counter()
        if g.beta > 0 and samples:
            with model.disable_adapter() if reference is None else contextlib.nullcontext():
                ref = forward_logprobs(
                    reference or model, samples, g.micro_batch_size, g.temperature
                )
            for s, logprobs in zip(samples, ref, strict=True):
                s["ref_logprobs"] = logprobs
        if g.old_logprobs == "recompute" and samples:
            old = forward_logprobs(model, samples, g.micro_batch_size, g.temperature)
            for s, logprobs in zip(samples, old, strict=True):
                s["old_logprobs"] = logprobs
        for s in samples:  # failed rewards, and truncated completions under overlong filtering
            s["trained"] = not (s["skipped"] or (g.overlong_filter and s["finish"] == "length"))
        for s, advantages in zip(
            samples, advantages_of(samples, g) if samples else [], strict=True
        ):
            s["advantages"] = advantages
        updated = time.perf_counter()
        updates: list[dict] = []
        diff: list[float] = []
        for epoch in range(g.epochs):
            order = range(len(groups))
            if epoch:  # later epochs visit the groups in a seeded shuffled order
                rng = torch.Generator().manual_seed(r.seed + 1_000_003 * step + epoch)
                order = torch.randperm(len(groups), generator=rng).tolist()
            trained = [s for k in order for s in groups[k] if s["trained"]]
            for i in range(0, len(trained), minibatch):
                mbs = micro_batches(trained[i : i + minibatch], g.micro_batch_size, device)
                weights = [loss_weight(mb, g.aggregation) for mb in mbs]
                scale = sum(weights) / sum(mb.num_tokens for mb in mbs)
                check = diff if epoch == 0 and i == 0 else None
                fn = functools.partial(loss_fn, scale=scale, diff=check)
                updates.append(learner.step(mbs, weights, fn))
        done = step + 1
        metrics.update(_step_metrics(sampled_all, updates, diff))
        metrics["time/sample_s"] = sampled - began
        metrics["time/reference_s"] = updated - sampled
        metrics["time/train_s"] = time.perf_counter() - updated
        tokens = sum(len(s["tokens"]) for s in sampled_all)
        metrics["completion_tokens_per_s"] = tokens / (time.perf_counter() - began)
        if eval_rows and (done == r.max_steps or (r.eval_every and done % r.eval_every == 0)):
            metrics["eval/accuracy"] = summary["accuracy_after"] = evaluate()
        if done % r.log_every == 0 or done == r.max_steps or "eval/accuracy" in metrics:
            logger.log(done, metrics)
            sample_log.write(done, [_sample_row(s) for s in sampled_all[: r.log_samples]])
        else:
            logger.advance(done)
        if "eval/accuracy" in metrics:
            plot_curves(out, CURVES, out / "curves.png")
        if r.save_every and done % r.save_every == 0 and done < r.max_steps:
            learner.save(out, done, keep=r.keep_checkpoints)

    logger.close()
    plot_curves(out, CURVES, out / "curves.png")
    save_pretrained(model, tokenizer, out / "final")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fill_skipped(group: list[dict]) -> None:
    """A completion whose reward failed under the 'skip' fallback is left out of the loss; its
    reward becomes the mean of the others' so that it does not move the group's baseline."""
    ok = [s["reward"] for s in group if not s["skipped"]]
    for s in group:
        if s["skipped"]:
            s["reward"] = sum(ok) / len(ok) if ok else 0.0


def _step_metrics(samples: list[dict], updates: list[dict], diff: list[float]) -> dict:
    """Means over every completion sampled (dropped groups too: kept ones are a biased view),
    and over the optimizer steps."""
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    out = {
        "reward": mean([s["reward"] for s in samples]),
        "accuracy": mean([float(s["correct"]) for s in samples]),
        "completion_length": mean([len(s["tokens"]) for s in samples]),
        "truncated_fraction": mean([float(s["finish"] == "length") for s in samples]),
        "optimizer_steps": len(updates),
    }
    for name in samples[0]["components"] if samples else []:
        out[f"reward/{name}"] = mean([s["components"][name] for s in samples])
    for key in updates[0] if updates else []:
        out[key] = mean([u[key] for u in updates])
    if diff:
        out["old_logprob_max_abs_diff"] = max(diff)
    return out


def _sample_row(s: dict) -> dict:
    return {
        "prompt": s["row"]["prompt"],
        "completion": s["text"],
        "reward": round(s["reward"], 4),
        "advantage": None if s["advantages"] is None else round(float(s["advantages"][0]), 4),
        "correct": s["correct"],
        "finish": s["finish"],
        "components": s["components"],
    }
