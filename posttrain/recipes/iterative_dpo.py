"""Iterative DPO: rounds of sampling the policy, pairing its best and worst answers by reward,
and training on those pairs with any loss of `posttrain dpo`.

One round (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback", Alg. 1;
Pang et al. 2024, "Iterative Reasoning Preference Optimization", Sec. 2):
1. Draw `prompts_per_round` training prompts (a seeded epoch order read on from the last round,
   so every round sees fresh prompts) and sample `samples_per_prompt` completions of each from
   the current policy (the online core, `posttrain.online`, with the `sampling` engine).
2. Score them with the weighted rewards (verifiers, reward models, judges; unset, the task's
   own), as `posttrain grpo` does.
3. Pair, per prompt, the highest-scored completion (chosen) with the lowest-scored one
   (rejected), when they differ in reward (`best_worst_pair`). A truncated completion is not
   chosen unless `chosen_truncated`; blank completions and skipped scores (a reward that failed
   under the 'skip' fallback) take no part.
4. `posttrain dpo` on those pairs, starting from the current policy; the reference is the
   round's starting policy (`reference: previous`, as both papers do) or the first round's
   (`initial`). Its final model is the next round's policy.
5. Held-out accuracy (`posttrain.eval.heldout`: greedy by default; the first reward decides
   `correct`) every `run.eval_every` rounds, and a metrics line per round.

`run.max_steps` counts rounds.

Pairs are built from the completion *texts*; `posttrain dpo` tokenizes them again (with the eos
token after each answer). With a byte tokenizer that is the sampled token sequence; with a
BPE tokenizer it may split a few words differently from how they were sampled.

Each round lives in `run.out_dir/round-K/` (pairs, the DPO run, `summary.json`). A round is done
once its summary is written (atomically); a rerun skips done rounds, redoes a partial round's
sampling (seeded by the round, so the same pairs) and resumes its DPO run from its checkpoints.
"""

from __future__ import annotations

import math
from contextlib import closing
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from posttrain.config import (
    EvaluationConfig,
    PromptDataConfig,
    RunConfig,
    SamplingConfig,
    Section,
)
from posttrain.data.prompts import Prompt, load_prompts
from posttrain.data.tokenize import uses_chat_template
from posttrain.eval.heldout import evaluate_prompts, heldout_params
from posttrain.files import write_jsonl_atomic
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer
from posttrain.online import Rollout, draw, sample_scored, sampled_metrics, task_reward
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import run as run_dpo
from posttrain.rewards import CompositeReward
from posttrain.rollout import SamplingParams, build_sampler, sampling_params
from posttrain.train.distributed import Dist
from posttrain.train.run import Run

CURVES = ("eval/accuracy", "sample/accuracy", "sample/reward", "dpo/eval/rewards/accuracy/after")


class RoundsSection(Section):
    renamed: ClassVar[dict[str, str]] = {"rounds": "run.max_steps"}

    prompts_per_round: int = Field(1000, ge=1)
    """Training prompts sampled each round (fresh ones each round, in a seeded order)."""
    samples_per_prompt: int = Field(8, ge=2)
    """Completions sampled per prompt; the best and the worst of them make the pair."""
    chosen_truncated: bool = False
    """Let a completion cut at sampling.max_new_tokens be chosen (DPO then trains an eos where
    sampling cut it short); off, such completions can only be rejected."""
    eval_pairs_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of each round's pairs held out of its DPO run, to track implicit-reward accuracy."""
    reference: Literal["previous", "initial"] = "previous"
    """DPO's reference in round K: the round's starting policy, or the first round's."""
    dpo_epochs: float | None = Field(None, gt=0)
    """Passes each round's DPO run makes over the round's training pairs (its
    dpo.run.max_steps becomes ceil(dpo_epochs x pairs / dpo.train.batch_size)); unset:
    dpo.run.max_steps as given. Rounds that find few pairs then train less, not for more
    epochs: a fixed step count over a few dozen pairs overfits them (docs/learning.md)."""


class IterativeDPOConfig(Section):
    data: PromptDataConfig = PromptDataConfig()
    """Prompts: a task, or prompt files; the held-out ones are evaluated every round."""
    rewards: list[dict[str, Any]] | None = None
    """Weighted reward functions `{name, weight, fallback, timeout_s, options}`, summed
    (unset: the task's own verifiers). The first decides `accuracy`: a completion is correct
    when it scores at least 1 there."""
    sampling: SamplingConfig = SamplingConfig()
    """The rollout engine and how each round samples."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out evaluation (greedy by default)."""
    iterate: RoundsSection = RoundsSection()
    """How each round pairs its samples."""
    dpo: DPOConfig = DPOConfig()
    """Each round's `posttrain dpo` run: `dpo.model.path` is the first round's policy; the
    recipe sets data.train / data.eval / chat_template, run.out_dir and reference.model."""
    run: RunConfig = RunConfig(out_dir="runs/iterative-dpo", max_steps=3, eval_every=1)
    """Output directory, seed, device, rounds (max_steps), evaluation every eval_every rounds."""

    @model_validator(mode="after")
    def _rounds_own_their_data(self) -> IterativeDPOConfig:
        taken = {
            "dpo.data.train": self.dpo.data.train,
            "dpo.data.eval": self.dpo.data.eval,
            "dpo.reference.model": self.dpo.reference.model,
        }
        for key, value in taken.items():
            if value:
                raise ValueError(
                    f"{key}: set by each round (leave it empty; see iterate.reference)"
                )
        return self


def best_worst_pair(group: list[Rollout], chosen_truncated: bool = False) -> tuple[int, int] | None:
    """Indices `(chosen, rejected)` into one prompt's scored rollouts: the highest reward
    (among those not truncated, unless `chosen_truncated`) and the lowest; the first in sampling
    order on ties. Blank completions (an eos straight away) and skipped scores take no part.
    None when no completion may be chosen or the two rewards are equal."""
    usable = [i for i, r in enumerate(group) if not r.skipped and r.text.strip()]
    choosable = [i for i in usable if chosen_truncated or not group[i].truncated]
    if not choosable:
        return None
    chosen = max(choosable, key=lambda i: (group[i].reward, -i))
    rejected = min(usable, key=lambda i: (group[i].reward, i))
    if group[rejected].reward >= group[chosen].reward:
        return None
    return chosen, rejected


@torch.no_grad()
def sample_and_score(
    cfg: IterativeDPOConfig, model_dir: str, prompts: list[Prompt], reward: CompositeReward,
    params: SamplingParams, *, seed: int, dist: Dist,
) -> list[list[Rollout]]:  # fmt: skip
    """`params.n` scored rollouts of each prompt from the policy saved at `model_dir`; each
    process samples its share and all of them get every group."""
    model = load_model(cfg.dpo.model, dist.device, trainable=False, path=model_dir)
    with closing(build_sampler(cfg.sampling, model, load_tokenizer(model_dir), seed)) as sampler:
        return sample_scored(sampler, prompts, reward, params, dist=dist)


def run(cfg: IterativeDPOConfig) -> dict:
    """All rounds; returns the summary also written to `summary.json`."""
    r, initial = cfg.iterate, cfg.dpo.model.path
    run = Run(cfg.run, cfg, curves=CURVES, x_label="round")
    out, seed, dist = run.out, cfg.run.seed, run.dist
    tokenizer = load_tokenizer(initial, "dpo.model.path")
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    max_prompt = fit_to_context(
        cfg.data.max_prompt_length, initial, "data.max_prompt_length", cfg.sampling.max_new_tokens
    )
    train, held_out = load_prompts(
        cfg.data, tokenizer, chat=chat, max_prompt_length=max_prompt, seed=seed
    )
    reward = task_reward(cfg.rewards, cfg.data)
    eval_params = heldout_params(cfg.evaluation, cfg.sampling, seed)

    done = run.done_rounds()
    policy = done[-1]["model"] if done else initial

    def evaluate() -> dict:
        if not held_out:
            return {}
        model = load_model(cfg.dpo.model, run.device, trainable=False, path=policy)
        with closing(build_sampler(cfg.sampling, model, load_tokenizer(policy), seed)) as sampler:
            result = evaluate_prompts(sampler, held_out, reward, eval_params, dist=dist)
        rows = [x.as_row() for x in result.rollouts[: cfg.evaluation.log_samples]]
        run.samples(run.step, rows, name="eval_samples")
        return result.metrics

    run.begin(evaluate)
    for step in run.steps():
        k = step + 1
        folder = out / f"round-{k}"
        folder.mkdir(exist_ok=True)
        prompts = draw(train, step, r.prompts_per_round, seed)
        params = sampling_params(cfg.sampling, n=r.samples_per_prompt, seed=seed * 1_000_003 + k)
        groups = sample_and_score(cfg, policy, prompts, reward, params, seed=seed + k, dist=dist)
        pairs = []
        for prompt, group in zip(prompts, groups, strict=True):
            picked = best_worst_pair(group, r.chosen_truncated)
            if picked is not None:
                chosen, rejected = (group[i].text for i in picked)
                pairs.append({"prompt": prompt.text, "chosen": chosen, "rejected": rejected})
        if len(pairs) < 2:
            raise RuntimeError(
                f"round {k}: {len(pairs)} of {len(prompts)} prompts gave a pair (a completion to "
                "choose and one scored lower); sample more per prompt, raise max_new_tokens or "
                "the temperature, use a denser reward, or set iterate.chosen_truncated"
            )
        n_eval = max(int(len(pairs) * r.eval_pairs_fraction), 1) if r.eval_pairs_fraction else 0
        if dist.is_main:
            for name, part in (("train", pairs[n_eval:]), ("eval", pairs[:n_eval])):
                write_jsonl_atomic(folder / f"pairs-{name}.jsonl", part)
        dist.barrier()

        d = cfg.dpo.model_copy(deep=True)
        d.model.path = policy
        d.reference.model = initial if r.reference == "initial" else ""
        d.data.train = str(folder / "pairs-train.jsonl")
        d.data.eval = str(folder / "pairs-eval.jsonl") if n_eval else ""
        d.data.eval_fraction = 0.0
        d.data.chat_template = cfg.data.chat_template
        d.run.out_dir = str(folder / "dpo")
        if r.dpo_epochs:
            train_pairs = len(pairs) - n_eval
            d.run.max_steps = max(1, math.ceil(r.dpo_epochs * train_pairs / d.train.batch_size))
        d.run.device, d.run.progress = cfg.run.device, cfg.run.progress
        trained = run_dpo(d)
        policy = str(folder / "dpo" / "final")

        rollouts = [x for group in groups for x in group]
        record = {f"sample/{key}": v for key, v in sampled_metrics(rollouts).items()}
        record.update(prompts=len(prompts), pairs=len(pairs))
        for when in ("before", "after"):
            for key in ("eval/rewards/accuracy", "eval/loss"):
                if key in trained.get(f"eval_{when}", {}):
                    record[f"dpo/{key}/{when}"] = trained[f"eval_{when}"][key]
        run.end_round(k, record, policy, evaluate)
        if cfg.run.progress:
            print(f"round {k}/{cfg.run.max_steps}: {len(pairs)} pairs from {len(prompts)} "
                  f"prompts, sample accuracy {record['sample/accuracy']:.3f}, held-out accuracy "
                  f"{record.get('eval/accuracy')}", flush=True)  # fmt: skip
    return run.finish()
