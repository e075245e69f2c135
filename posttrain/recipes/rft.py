"""Rejection-sampling fine-tuning (expert iteration): rounds of sampling the policy, keeping
the answers a verifier accepts, and supervised fine-tuning on them.

One round (STaR, Zelikman et al. 2022, Sec. 3.1 without rationalization; Llama 2's rejection
sampling, Touvron et al. 2023, Sec. 3.2.3, with a verifier in place of the reward model;
"expert iteration" in Anthony et al. 2017, Havrilla et al. 2024):
1. Draw `prompts_per_round` training prompts (a seeded epoch order read on from the last
   round) and sample `samples_per_prompt` answers of each from the current policy (the online
   core, `posttrain.online`).
2. Score them with the verifier (`rewards`, unset: the task's own; the first reward decides
   `correct`) and keep, per prompt, up to `keep_per_prompt` distinct correct answers that were
   not cut at max_new_tokens.
3. `posttrain sft` on the kept (prompt, answer) pairs, starting from the current policy
   (`base: previous`, as STaR's later variants and Llama 2 do) or from the first policy on all
   answers kept so far (`base: initial`, STaR's restart that avoids drift). Its final model is
   the next round's policy.
4. Held-out accuracy (`posttrain.eval.heldout`, greedy by default) every `run.eval_every`
   rounds.

`run.max_steps` counts rounds. Each round lives in `run.out_dir/round-K/` (the kept answers, the
SFT run, `summary.json`); a rerun skips done rounds and resumes a partial round's SFT run.
"""

from __future__ import annotations

import json
from contextlib import closing
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import EvaluationConfig, PromptDataConfig, RunConfig, SamplingConfig, Section
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import uses_chat_template
from posttrain.eval.heldout import evaluate_prompts, heldout_params
from posttrain.files import write_jsonl_atomic
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer
from posttrain.online import Rollout, draw, sample_scored, sampled_metrics, task_reward
from posttrain.recipes.sft import SFTConfig
from posttrain.recipes.sft import run as run_sft
from posttrain.rollout import build_sampler, sampling_params
from posttrain.train.run import Run

CURVES = ("eval/accuracy", "sample/accuracy", "kept")


class RFTSection(Section):
    prompts_per_round: int = Field(1000, ge=1)
    """Training prompts sampled each round (fresh ones each round, in a seeded order)."""
    samples_per_prompt: int = Field(8, ge=1)
    """Answers sampled per prompt."""
    keep_per_prompt: int = Field(4, ge=1)
    """At most this many distinct correct answers kept per prompt."""
    keep_truncated: bool = False
    """Keep correct answers cut at sampling.max_new_tokens too (SFT then trains an eos where
    sampling cut them)."""
    base: Literal["previous", "initial"] = "previous"
    """Each round fine-tunes the previous round's policy on its answers, or the first policy
    on every answer kept so far."""


class RFTConfig(Section):
    data: PromptDataConfig = PromptDataConfig()
    """Prompts: a task, or prompt files; the held-out ones are evaluated every round."""
    rewards: list[dict[str, Any]] | None = None
    """The verifier (unset: the task's own); the first reward decides `correct`."""
    sampling: SamplingConfig = SamplingConfig()
    """How each round samples."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out evaluation (greedy by default)."""
    rft: RFTSection = RFTSection()
    """What each round samples and keeps."""
    sft: SFTConfig = SFTConfig()
    """Each round's `posttrain sft` run: `sft.model.path` is the first policy; the recipe sets
    data.train, data.eval and run.out_dir."""
    run: RunConfig = RunConfig(out_dir="runs/rft", max_steps=3, eval_every=1)
    """Output directory, seed, device, rounds (max_steps), evaluation every eval_every rounds."""

    @model_validator(mode="after")
    def _rounds_own_their_data(self) -> RFTConfig:
        for key, value in {"sft.data.train": self.sft.data.train,
                           "sft.data.eval": self.sft.data.eval}.items():  # fmt: skip
            if value:
                raise ValueError(f"{key}: set by each round (leave it empty)")
        return self


def keep_correct(group: list[Rollout], limit: int, truncated: bool = False) -> list[Rollout]:
    """Up to `limit` distinct correct, non-blank answers (untruncated unless `truncated`), in
    sampling order."""
    kept: dict[str, Rollout] = {}
    for r in group:
        if r.correct and (truncated or not r.truncated) and not r.skipped and r.text.strip():
            kept.setdefault(r.text, r)
    return list(kept.values())[:limit]


def run(cfg: RFTConfig) -> dict:
    """All rounds; returns the summary also written to `summary.json`."""
    r, initial = cfg.rft, cfg.sft.model.path
    run = Run(cfg.run, cfg, curves=CURVES, x_label="round")
    if run.dist.world_size > 1:
        raise NotImplementedError("posttrain rft runs in one process; start it without torchrun")
    out, seed = run.out, cfg.run.seed
    tokenizer = load_tokenizer(initial, "sft.model.path")
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

    def sampler_of(model_dir: str):
        model = load_model(cfg.sft.model, run.device, trainable=False, path=model_dir)
        return build_sampler(cfg.sampling, model, load_tokenizer(model_dir), seed)

    def evaluate() -> dict:
        if not held_out:
            return {}
        with closing(sampler_of(policy)) as sampler:
            result = evaluate_prompts(sampler, held_out, reward, eval_params)
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
        with closing(sampler_of(policy)) as sampler:
            groups = sample_scored(sampler, prompts, reward, params)
        rows = [
            {"prompt": x.prompt.text, "completion": x.text}
            for group in groups
            for x in keep_correct(group, r.keep_per_prompt, r.keep_truncated)
        ]
        if not rows:
            raise RuntimeError(
                f"round {k}: no sampled answer of {len(prompts)} prompts was verified correct; "
                "sample more per prompt, raise the temperature, or start from a stronger policy"
            )
        write_jsonl_atomic(folder / "kept.jsonl", rows)
        s = cfg.sft.model_copy(deep=True)
        s.data.train = str(folder / "kept.jsonl")
        if r.base == "initial":  # every answer kept so far, from the first policy
            earlier = [out / f"round-{j}" / "kept.jsonl" for j in range(1, k)]
            every = [json.loads(line) for p in earlier for line in p.read_text().splitlines()]
            write_jsonl_atomic(folder / "kept-all.jsonl", every + rows)
            s.data.train = str(folder / "kept-all.jsonl")
        s.model.path = initial if r.base == "initial" else policy
        s.data.eval, s.data.eval_fraction = "", 0.0
        s.data.chat_template = cfg.data.chat_template
        s.run.out_dir = str(folder / "sft")
        s.run.device, s.run.progress, s.run.seed = cfg.run.device, cfg.run.progress, seed + k
        run_sft(s)
        policy = str(folder / "sft" / "final")

        sampled = [x for group in groups for x in group]
        record = {f"sample/{key}": v for key, v in sampled_metrics(sampled).items()}
        record.update(prompts=len(prompts), kept=len(rows),
                      prompts_solved=sum(any(x.correct for x in g) for g in groups))  # fmt: skip
        run.end_round(k, record, policy, evaluate)
        if cfg.run.progress:
            print(f"round {k}/{cfg.run.max_steps}: kept {len(rows)} answers of "
                  f"{record['prompts_solved']}/{len(prompts)} prompts, sample accuracy "
                  f"{record['sample/accuracy']:.3f}, held-out accuracy "
                  f"{record.get('eval/accuracy')}", flush=True)  # fmt: skip
    return run.finish()
