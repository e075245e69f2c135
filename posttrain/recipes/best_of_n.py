"""Best-of-N: sample N answers per held-out prompt and pick one by a verifier, a learned outcome
reward model, a process reward model, or majority vote.

For every held-out prompt the policy samples `n` answers once (the online core); the verifier
(`rewards`, unset: the task's own; the first decides `correct`) and every scorer in `scorers`
score each. Then for N = 1, 2, 4, ..., n the table holds, as expectations over a random
N-subset of the n (`posttrain.eval.best_of_n`, exact except majority vote's seeded draws):

- `pass@N`: some answer of the N is correct (Chen et al. 2021's unbiased estimator);
- `verifier@N`: the answer the verifier scores highest is correct (= pass@N for a 0/1 verifier);
- `<scorer>@N`: the answer the scorer scores highest is correct, with its mean verifier score
  (`gold`) and its own score (`proxy`): a learned scorer may pick worse as N grows
  (over-optimisation; Gao et al. 2022);
- `majority@N`: the most frequent final answer (`majority.answer_pattern`) is correct
  (self-consistency, Wang et al. 2023);
- `kl`: ln N - (N - 1) / N, best-of-N's KL to the sampling policy, the x axis on which
  best-of-N sits beside PPO and GRPO runs.

Writes `best_of_n.json`, `best_of_n.md` (the table) and `best_of_n.png` (accuracy against N, and
gold and proxy against KL) to `run.out_dir`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from pydantic import Field, field_validator

from posttrain.config import (
    ModelConfig,
    PromptDataConfig,
    RunConfig,
    SamplingConfig,
    Section,
)
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import uses_chat_template
from posttrain.eval.best_of_n import best_of_n, best_of_n_kl, majority_vote, pass_at_k
from posttrain.files import write_json_atomic
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer
from posttrain.online import Rollout, reward_inputs, sample, score, task_reward
from posttrain.rewards import RewardSpec, build_composite
from posttrain.rollout import build_sampler, sampling_params
from posttrain.train.run import Run


class MajoritySection(Section):
    answer_pattern: str = r"(-?\d+(?:\.\d+)?)\D*$"
    """Regex whose first group (else whole match), searched in a completion, is its final
    answer for voting; default: the last number. No match: the answer does not vote."""

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return pattern


class BestOfNConfig(Section):
    model: ModelConfig = ModelConfig()
    """The policy that samples."""
    data: PromptDataConfig = PromptDataConfig()
    """Prompts: a task or prompt files; the held-out ones (data.eval_size) are evaluated."""
    rewards: list[dict[str, Any]] | None = None
    """The verifier (unset: the task's own); the first reward decides `correct`."""
    scorers: list[RewardSpec] = []
    """Learned scorers that pick answers, e.g. {name: reward_model, label: orm, options: {path:
    runs/rm/final}} and {name: prm, options: {path: runs/prm/final, aggregate: min}}."""
    majority: MajoritySection = MajoritySection()
    """How majority vote reads an answer."""
    n: int = Field(16, ge=1)
    """Answers sampled per prompt: the table runs N = 1, 2, 4, ... up to n."""
    sampling: SamplingConfig = SamplingConfig()
    """How answers are sampled (temperature, max_new_tokens, stop strings)."""
    run: RunConfig = RunConfig(out_dir="runs/best-of-n")
    """Output directory, seed and device (steps are unused)."""


def sizes(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out if out[-1] == n else [*out, n]


def final_answer(text: str, pattern: re.Pattern) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


def table_rows(
    groups: list[list[Rollout]], scores: dict[str, list[list[float]]], cfg: BestOfNConfig
) -> list[dict]:
    """One row per N: the means over prompts of each statistic (module docstring)."""
    pattern = re.compile(cfg.majority.answer_pattern)
    rows = []
    for N in sizes(cfg.n):
        row: dict[str, float] = {"N": N, "kl": best_of_n_kl(N)}
        stats: dict[str, list[float]] = {}
        for k, group in enumerate(groups):
            correct = [float(r.correct) for r in group]
            gold = [r.reward for r in group]
            stats.setdefault("pass", []).append(pass_at_k(len(group), int(sum(correct)), N))
            stats.setdefault("verifier", []).append(best_of_n(gold, correct, N))
            for name, per_prompt in scores.items():
                s = per_prompt[k]
                stats.setdefault(name, []).append(best_of_n(s, correct, N))
                stats.setdefault(f"{name}/gold", []).append(best_of_n(s, gold, N))
                stats.setdefault(f"{name}/proxy", []).append(best_of_n(s, s, N))
            answers = [final_answer(r.text, pattern) for r in group]
            stats.setdefault("majority", []).append(
                majority_vote(answers, correct, N, seed=cfg.run.seed + k)
            )
        row.update({key: sum(v) / len(v) for key, v in stats.items()})
        rows.append(row)
    return rows


def markdown(rows: list[dict], names: list[str]) -> str:
    columns = ["N", "kl", "pass", "verifier", *names, "majority"]
    head = "| " + " | ".join(f"{c}@N" if c not in ("N", "kl") else c for c in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row["N"]), f"{row['kl']:.2f}"] + [f"{100 * row[c]:.1f}%" for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], names: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ns = [r["N"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ["pass", "verifier", *names, "majority"]:
        style = "--" if key == "pass" else "-"
        left.plot(Ns, [100 * r[key] for r in rows], style, marker="o", label=f"{key}@N")
    left.set_xscale("log", base=2)
    left.set(xlabel="N (answers per prompt)", ylabel="held-out accuracy (%)")
    left.legend(fontsize=8)
    kl = [r["kl"] for r in rows]
    for name in names:
        right.plot(kl, [r[f"{name}/gold"] for r in rows], marker="o", label=f"{name}: gold")
        right.plot(kl, [r[f"{name}/proxy"] for r in rows], ":", marker=".", label=f"{name}: proxy")
    right.plot(kl, [r["verifier"] for r in rows], "--", label="verifier-picked: gold")
    right.set(xlabel="KL to the sampling policy (nats)", ylabel="score of the picked answer")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def run(cfg: BestOfNConfig) -> dict:
    """Sample, score, tabulate and plot; returns the summary also written to `summary.json`."""
    run = Run(cfg.run, cfg)
    seed = cfg.run.seed
    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    max_prompt = fit_to_context(
        cfg.data.max_prompt_length, cfg.model.path, "data.max_prompt_length",
        cfg.sampling.max_new_tokens,
    )  # fmt: skip
    _, held_out = load_prompts(
        cfg.data, tokenizer, chat=chat, max_prompt_length=max_prompt, seed=seed
    )
    if not held_out:
        raise ValueError("data: no held-out prompts to evaluate (set data.eval or data.eval_size)")
    verifier = task_reward(cfg.rewards, cfg.data)
    scorers = {spec.label or spec.name: build_composite([spec]) for spec in cfg.scorers}
    sampler = build_sampler(cfg.sampling, load_model(cfg.model, run.device, trainable=False),
                            tokenizer, seed)  # fmt: skip
    groups: list[list[Rollout]] = []
    scores: dict[str, list[list[float]]] = {name: [] for name in scorers}
    for start in range(0, len(held_out), 64):
        params = sampling_params(cfg.sampling, n=cfg.n, seed=seed * 1_000_003 + start)
        rollouts = sample(sampler, held_out[start : start + 64], params)
        score(rollouts, verifier)
        inputs = reward_inputs(rollouts)
        for name, scorer in scorers.items():
            out = scorer(inputs[0], inputs[1], **inputs[2]).scores
            scores[name] += [out[k : k + cfg.n] for k in range(0, len(out), cfg.n)]
        groups += [rollouts[k : k + cfg.n] for k in range(0, len(rollouts), cfg.n)]
    sampler.close()
    rows = table_rows(groups, scores, cfg)
    names = list(scorers)
    (run.out / "best_of_n.md").write_text(markdown(rows, names))
    write_json_atomic(run.out / "best_of_n.json", rows)
    plot(rows, names, run.out / "best_of_n.png")
    samples = [
        {"prompt": r.prompt.text, "completion": r.text, "correct": r.correct,
         **{name: scores[name][k][i] for name in names}}
        for k, group in enumerate(groups[:8]) for i, r in enumerate(group)
    ]  # fmt: skip
    (run.out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    run.summary.update(prompts=len(groups), n=cfg.n, table=rows)
    if cfg.run.progress:
        print(markdown(rows, names), end="")
    run.write_summary()
    return run.summary
