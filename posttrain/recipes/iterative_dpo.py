"""Iterative DPO: rounds of sampling the policy, pairing its best and worst answers by reward,
and training on those pairs with any loss of `posttrain dpo`.

One round (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback", Alg. 1;
Pang et al. 2024, "Iterative Reasoning Preference Optimization", Sec. 2):
1. Draw `prompts_per_round` training prompts (a seeded epoch order read on from the last round,
   so every round sees fresh prompts) and sample `samples_per_prompt` completions of each from
   the current policy (`HFSampler`, temperature `temperature`).
2. Score them with the weighted rewards (`posttrain.recipes.grpo_inputs.Scorer`: verifiers,
   reward models, judges), as `posttrain grpo` does.
3. Pair, per prompt, the highest-scored completion (chosen) with the lowest-scored one
   (rejected), when they differ in reward (`best_worst_pair`). A truncated completion is not
   chosen unless `chosen_truncated`; blank completions and skipped scores (a reward that failed
   under the 'skip' fallback) take no part.
4. `posttrain dpo` on those pairs, starting from the current policy; the reference is the
   round's starting policy (`reference: previous`, as both papers do) or the first round's
   (`initial`). Its final model is the next round's policy.
5. Held-out accuracy of greedy answers (the first reward decides `correct`), and a metrics line.

Pairs are built from the completion *texts*; `posttrain dpo` tokenizes them again (with the eos
token after each answer). With a byte tokenizer that is the sampled token sequence; with a
BPE tokenizer it may split a few words differently from how they were sampled.

Each round lives in `out_dir/round-K/` (pairs, the DPO run, `summary.json`). A round is done
once its summary is written (atomically); a rerun skips done rounds, redoes a partial round's
sampling (seeded by the round, so the same pairs) and resumes its DPO run from its checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from posttrain.config import Section, dump_config
from posttrain.data.tokenize import prompt_ids, uses_chat_template
from posttrain.eval.curves import plot_curves
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import run as run_dpo
from posttrain.recipes.grpo_config import DataSection
from posttrain.recipes.grpo_inputs import Scorer, load_prompt_rows
from posttrain.rollout import HFSampler, SamplingParams
from posttrain.train.checkpoint import seed_all, write_atomic
from posttrain.train.distributed import init_distributed
from posttrain.train.learner import step_indices
from posttrain.train.metrics import MetricsLogger

CURVES = ("eval/accuracy", "sample/accuracy", "sample/reward", "dpo/eval/rewards/accuracy/after")


class RoundsSection(Section):
    rounds: int = Field(3, ge=1)
    """Sampling-and-training rounds."""
    prompts_per_round: int = Field(1000, ge=1)
    """Training prompts sampled each round (fresh ones each round, in a seeded order)."""
    samples_per_prompt: int = Field(8, ge=2)
    """Completions sampled per prompt; the best and the worst of them make the pair."""
    max_new_tokens: int = 256
    """Longest completion; longer ones are cut (and not chosen, unless chosen_truncated)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    stop: list[str] = []
    """Strings that end a completion."""
    chosen_truncated: bool = False
    """Let a completion cut at max_new_tokens be chosen (DPO then trains an eos where sampling
    cut it short); off, such completions can only be rejected."""
    eval_pairs_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of each round's pairs held out of its DPO run, to track implicit-reward accuracy."""
    reference: Literal["previous", "initial"] = "previous"
    """DPO's reference in round K: the round's starting policy, or the first round's."""


class IterativeDPOConfig(Section):
    data: DataSection = DataSection()
    """Prompts: a task, or prompt files; the held-out ones score greedy answers each round."""
    rewards: list[dict[str, Any]] = [{"name": "exact_match", "weight": 1.0}]
    """Weighted reward functions `{name, weight, fallback, timeout_s, options}`, summed. The
    first decides `accuracy`: a completion is correct when it scores at least 1 there."""
    iterate: RoundsSection = RoundsSection()
    """Rounds, and how each samples and pairs."""
    dpo: DPOConfig = DPOConfig()
    """Each round's `posttrain dpo` run: `dpo.model.path` is the first round's policy; the
    recipe sets data.train / data.eval / chat_template, train.out_dir and reference.model."""
    out_dir: str = "runs/iterative-dpo"
    """Run directory: config, metrics.jsonl, curves.png, summary.json, round-K/."""
    seed: int = 0
    """Seeds the prompt order and the sampler (derived from the round, so reruns are exact)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to sample and train: 'auto' picks cuda when available."""
    progress: bool = True
    """Progress bars on the terminal (each round's DPO run too)."""

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


def best_worst_pair(scored: list[dict], chosen_truncated: bool = False) -> tuple[int, int] | None:
    """Indices `(chosen, rejected)` into one prompt's scored completions: the highest reward
    (among those not truncated, unless `chosen_truncated`) and the lowest; the first in sampling
    order on ties. Blank completions (an eos straight away) and skipped scores take no part.
    None when no completion may be chosen or the two rewards are equal. Each dict: `reward`,
    `skipped`, `finish` (the sampler's finish reason), `text`."""
    usable = [i for i, s in enumerate(scored) if not s["skipped"] and s["text"].strip()]
    choosable = [i for i in usable if chosen_truncated or scored[i]["finish"] != "length"]
    if not choosable:
        return None
    chosen = max(choosable, key=lambda i: (scored[i]["reward"], -i))
    rejected = min(usable, key=lambda i: (scored[i]["reward"], i))
    if scored[rejected]["reward"] >= scored[chosen]["reward"]:
        return None
    return chosen, rejected


@torch.no_grad()
def sample_and_score(
    model_dir: str, rows: list[dict], scorer: Scorer, params: SamplingParams, *,
    chat: bool, device: torch.device, seed: int, **load: Any,
) -> list[list[dict]]:  # fmt: skip
    """Per row, its `params.n` completions (`text`, `finish`) with their scores; `load`: keyword
    arguments of `load_causal_lm` (dtype, attention)."""
    model = load_causal_lm(model_dir, device, **load)
    tokenizer = load_tokenizer(model_dir)
    sampler = HFSampler(model, tokenizer, seed=seed)
    out: list[list[dict]] = [[] for _ in rows]
    for start in range(0, len(rows), 256):
        part = rows[start : start + 256]
        ids = [prompt_ids(tokenizer, row["prompt"], chat) for row in part]
        completions = sampler.generate(ids, params).completions
        per_row = [part[c.prompt_index] for c in completions]
        lengths = [len(c.token_ids) for c in completions]
        scored = scorer(per_row, [c.text for c in completions], lengths)
        for c, s in zip(completions, scored, strict=True):
            out[start + c.prompt_index].append({**s, "text": c.text, "finish": c.finish_reason})
    return out


def accuracy(groups: list[list[dict]]) -> float:
    """Fraction of completions the first reward judged correct."""
    flat = [s["correct"] for group in groups for s in group]
    return sum(flat) / max(len(flat), 1)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def run(cfg: IterativeDPOConfig) -> dict:
    """All rounds; returns the summary also written to `summary.json`."""
    r, out = cfg.iterate, Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    seed_all(cfg.seed)
    dist = init_distributed(cfg.device)
    if dist.world_size > 1:
        raise NotImplementedError(
            "posttrain iterative-dpo runs in one process; start it without torchrun"
        )
    device = dist.device
    initial = cfg.dpo.model.path
    if not initial:
        raise ValueError("dpo.model.path: the first round's policy is required")
    chat = uses_chat_template(load_tokenizer(initial), cfg.data.chat_template)
    train_rows, eval_rows = load_prompt_rows(cfg.data, seed=cfg.seed)
    scorer = Scorer(cfg.rewards)
    greedy = SamplingParams.greedy(r.max_new_tokens, stop=tuple(r.stop))
    m = cfg.dpo.model
    load = dict(chat=chat, device=device, dtype=m.dtype, attn_implementation=m.attn_implementation)

    def held_out(model_dir: str) -> float | None:
        if not eval_rows:
            return None
        groups = sample_and_score(model_dir, eval_rows, scorer, greedy, seed=cfg.seed, **load)
        return accuracy(groups)

    done = [json.loads(p.read_text()) for p in sorted(out.glob("round-*/summary.json"))]
    done = [d for k, d in enumerate(done, 1) if d["round"] == k]  # a gap ends the done prefix
    # One line per round; each round's DPO run draws its own progress bar.
    logger = MetricsLogger(
        out, enabled=True, total_steps=r.rounds, start_step=len(done), progress=False
    )
    summary: dict = {"rounds": done}
    if not done:
        summary["eval_accuracy_before"] = held_out(initial)
        logger.log(0, {"eval/accuracy": summary["eval_accuracy_before"]})
        write_json_atomic(out / "summary.json", summary)
    else:
        summary["eval_accuracy_before"] = json.loads((out / "summary.json").read_text())[
            "eval_accuracy_before"
        ]
    policy = done[-1]["model"] if done else initial

    for k in range(len(done) + 1, r.rounds + 1):
        folder = out / f"round-{k}"
        folder.mkdir(exist_ok=True)
        indices = step_indices(
            k - 1, num_examples=len(train_rows), batch_size=r.prompts_per_round, seed=cfg.seed
        )
        rows = [train_rows[i] for i in indices]
        params = SamplingParams(
            n=r.samples_per_prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
            top_p=r.top_p, stop=tuple(r.stop), seed=cfg.seed * 1_000_003 + k,
        )  # fmt: skip
        groups = sample_and_score(policy, rows, scorer, params, seed=cfg.seed + k, **load)
        pairs = []
        for row, group in zip(rows, groups, strict=True):
            picked = best_worst_pair(group, r.chosen_truncated)
            if picked is not None:
                chosen, rejected = (group[i]["text"] for i in picked)
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        if len(pairs) < 2:
            raise RuntimeError(
                f"round {k}: {len(pairs)} of {len(rows)} prompts gave a pair (a completion to choose "
                "and one scored lower); sample more per prompt, raise max_new_tokens or the "
                "temperature, use a denser reward, or set iterate.chosen_truncated"
            )
        n_eval = max(int(len(pairs) * r.eval_pairs_fraction), 1) if r.eval_pairs_fraction else 0
        for name, part in (("train", pairs[n_eval:]), ("eval", pairs[:n_eval])):
            (folder / f"pairs-{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))

        d = cfg.dpo.model_copy(deep=True)
        d.model.path = policy
        d.reference.model = initial if r.reference == "initial" else ""
        d.data.train = str(folder / "pairs-train.jsonl")
        d.data.eval = str(folder / "pairs-eval.jsonl") if n_eval else ""
        d.data.eval_fraction = 0.0
        d.data.chat_template = cfg.data.chat_template
        d.train.out_dir = str(folder / "dpo")
        d.train.device, d.train.progress = cfg.device, cfg.progress
        trained = run_dpo(d)
        policy = str(folder / "dpo" / "final")

        record = {
            "round": k,
            "model": policy,
            "prompts": len(rows),
            "pairs": len(pairs),
            "sample/accuracy": accuracy(groups),
            "sample/reward": sum(s["reward"] for g in groups for s in g if not s["skipped"])
            / max(sum(not s["skipped"] for g in groups for s in g), 1),
            "sample/truncated_fraction": sum(s["finish"] == "length" for g in groups for s in g)
            / sum(len(g) for g in groups),
            "eval/accuracy": held_out(policy),
        }
        for when in ("before", "after"):
            for key in ("eval/rewards/accuracy", "eval/loss"):
                if key in trained.get(f"eval_{when}", {}):
                    record[f"dpo/{key}/{when}"] = trained[f"eval_{when}"][key]
        write_json_atomic(folder / "summary.json", record)
        summary["rounds"].append(record)
        write_json_atomic(out / "summary.json", summary)
        logger.log(k, {key: v for key, v in record.items() if key not in ("round", "model")})
        if cfg.progress:
            print(f"round {k}/{r.rounds}: {len(pairs)} pairs from {len(rows)} prompts, "
                  f"sample accuracy {record['sample/accuracy']:.3f}, held-out greedy accuracy "
                  f"{record['eval/accuracy']}", flush=True)  # fmt: skip
        plot_curves(out, CURVES, out / "curves.png", x_label="round")

    logger.close()
    summary["final_model"] = policy
    write_json_atomic(out / "summary.json", summary)
    plot_curves(out, CURVES, out / "curves.png", x_label="round")
    return summary
