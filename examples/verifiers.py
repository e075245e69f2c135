"""Verifiers beyond one outcome reward, on worked two-digit sums judged by math-verify:
a process reward model from Monte-Carlo step labels, an outcome reward model, best-of-N by
each (and by majority vote), GRPO with and without process rewards, and rejection-sampling
fine-tuning beside iterative DPO.

    python examples/verifiers.py --out runs/verifiers            # about an hour on 2 CPU cores
    python examples/verifiers.py --out runs/verifiers --only bon # one stage (its inputs exist)

Stages (each skipped when its output exists):
- start: `posttrain arithmetic` worked sums, the GRPO example's SFT start (`--start-steps`).
- prm: `posttrain prm`: the start's solutions to 1000 training sums (4 each, T = 1), each step
  prefix completed 8 times and verified; a PRM trained on those labels (300 steps); held-out
  step-label accuracy on 200 held-out sums' solutions.
- orm: `posttrain rm` on the correct-vs-wrong pairs of the same solutions.
- bon: `posttrain best-of-n` on 300 held-out sums, N = 1..32: verifier, ORM, PRM (min and last
  step), majority vote.
- grpo: `posttrain grpo` (examples/grpo.yaml's settings, `--grpo-steps` steps) with the outcome
  reward only, and with PRM step rewards added (`grpo.process=sum`, and `min`).
- rft: `posttrain rft` and `posttrain iterative-dpo` from the same start, 3 rounds of 2000
  prompts x 8 samples each.
- kl: each trained policy's held-out accuracy at temperature 1 and KL to the start, drawn with
  best-of-N's curves against ln N - (N - 1) / N (kl.png).
- plots: held-out accuracy curves of the GRPO variants (grpo.png) and of RFT and iterative DPO
  by round (rounds.png).

Writes `report.json` in `--out`; docs/verifiers.md has the measured numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain.config import load_config

MATH = [
    {"name": "math", "options": {"extract": "full", "answer_pattern": r"(?:^|,)\s*(-?\d+)\s*$"}}
]
SAMPLING = {"max_new_tokens": 32, "temperature": 1.0}


def data(start: Path, train_size: int, eval_size: int) -> dict:
    return {"train": str(start / "data/train.jsonl"), "eval": str(start / "data/eval.jsonl"),
            "train_size": train_size, "eval_size": eval_size, "chat_template": "never"}  # fmt: skip


def stage_start(out: Path, steps: int) -> Path:
    from posttrain.recipes import arithmetic

    start = out / "start"
    if not (start / "sft/final").exists():
        arithmetic.run(arithmetic.ArithmeticConfig(
            out_dir=str(start), operators="+", worked=True, train_examples=9500, steps=steps,
        ))  # fmt: skip
    return start


def stage_prm(out: Path, start: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import prm

    cfg = prm.PRMConfig.model_validate({
        "model": {"path": str(start / "sft/final")},
        "data": data(start, a.label_prompts, a.label_eval), "rewards": MATH, "sampling": SAMPLING,
        "labels": {"separator": ", ", "solutions_per_prompt": 4, "rollouts_per_step": 8},
        "optim": {"lr": 3e-4, "warmup_steps": 20},
        "train": {"batch_size": 32, "micro_batch_size": 32},
        "run": {"out_dir": str(out / "prm"), "max_steps": a.train_steps, "eval_every": 50},
    })  # fmt: skip
    return prm.run(cfg)


def stage_orm(out: Path, start: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import rm

    cfg = rm.RMConfig.model_validate({
        "model": {"path": str(start / "sft/final")},
        "data": {"train": str(out / "prm/outcome-pairs.jsonl"), "eval_fraction": 0.1,
                 "chat_template": "never"},
        "optim": {"lr": 3e-4, "warmup_steps": 20}, "train": {"batch_size": 32},
        "run": {"out_dir": str(out / "orm"), "max_steps": a.train_steps, "eval_every": 50},
    })  # fmt: skip
    return rm.run(cfg)


def stage_bon(out: Path, start: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import best_of_n

    cfg = best_of_n.BestOfNConfig.model_validate({
        "model": {"path": str(start / "sft/final")}, "data": data(start, 1, a.eval_prompts),
        "rewards": MATH, "sampling": SAMPLING, "n": a.n,
        "scorers": [
            {"name": "reward_model", "label": "orm", "options": {"path": str(out / "orm/final")}},
            {"name": "prm", "label": "prm_min", "options": {"path": str(out / "prm/final")}},
            {"name": "prm", "label": "prm_last",
             "options": {"path": str(out / "prm/final"), "aggregate": "last"}},
        ],
        "majority": {"answer_pattern": r"(?:^|,)\s*(-?\d+)\s*$"},
        "run": {"out_dir": str(out / "best-of-n")},
    })  # fmt: skip
    return best_of_n.run(cfg)


def stage_grpo(out: Path, start: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import grpo

    prm_reward = {"name": "prm", "options": {"path": str(out / "prm/final"), "aggregate": "none"}}
    variants = {  # name: (rewards, grpo.process)
        "outcome": (MATH, "none"),
        "process-sum": ([*MATH, prm_reward], "sum"),
        "process-min": ([*MATH, prm_reward], "min"),
    }
    results = {}
    for name, (rewards, process) in variants.items():
        cfg = load_config(grpo.GRPOConfig, "examples/grpo.yaml", [
            f"model.path={start / 'sft/final'}", f"data.train={start / 'data/train.jsonl'}",
            f"data.eval={start / 'data/eval.jsonl'}", f"run.max_steps={a.grpo_steps}",
            f"run.out_dir={out / 'grpo' / name}", f"grpo.process={process}", "run.save_every=0",
            "run.eval_every=10", f"grpo.process_weight={a.process_weight}", f"run.seed={a.seed}",
        ])  # fmt: skip
        cfg.rewards = rewards
        results[name] = grpo.run(cfg)
    return results


def stage_plots(out: Path) -> dict:
    """grpo.png: held-out greedy accuracy of each GRPO variant by step; rounds.png: RFT's and
    iterative DPO's by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.train.metrics import read_metrics

    made = {}
    for name, runs, x_label in (
        ("grpo", sorted((out / "grpo").glob("*/metrics.jsonl")), "step"),
        ("rounds", [out / "rft/metrics.jsonl", out / "iterative-dpo/metrics.jsonl"], "round"),
    ):
        runs = [r for r in runs if r.exists()]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for path in runs:
            points = [(m["step"], 100 * m["eval/accuracy"]) for m in read_metrics(path.parent)
                      if "eval/accuracy" in m]  # fmt: skip
            ax.plot(*zip(*points, strict=True), marker="o", label=path.parent.name)
        ax.set(xlabel=x_label, ylabel="held-out greedy accuracy (%)", title=out.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        made[name] = str(out / f"{name}.png")
    return made


def stage_rft(out: Path, start: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import iterative_dpo, rft

    common = [f"data.train={start / 'data/train.jsonl'}", f"data.eval={start / 'data/eval.jsonl'}"]
    cfg = load_config(rft.RFTConfig, "examples/rft.yaml", [
        *common, f"sft.model.path={start / 'sft/final'}", f"run.out_dir={out / 'rft'}",
        f"run.max_steps={a.rounds}", f"rft.prompts_per_round={a.round_prompts}",
        f"sft.run.max_steps={a.round_steps}",
    ])  # fmt: skip
    dpo_cfg = load_config(iterative_dpo.IterativeDPOConfig, "examples/iterative_dpo.yaml", [
        *common, f"dpo.model.path={start / 'sft/final'}", f"run.out_dir={out / 'iterative-dpo'}",
        f"dpo.reference.cache_dir={out / 'iterative-dpo/reference-cache'}", "run.eval_every=1",
        f"run.max_steps={a.rounds}", f"iterate.prompts_per_round={a.round_prompts}",
        f"dpo.run.max_steps={a.round_steps}",
    ])  # fmt: skip
    return {"rft": rft.run(cfg), "iterative_dpo": iterative_dpo.run(dpo_cfg)}


def stage_kl(out: Path, start: Path, a: argparse.Namespace) -> dict:
    """Each trained policy's held-out accuracy at temperature 1 and its KL to the start (the mean
    over samples of sum_t log pi(y_t) - log pi_start(y_t)), and best-of-N's curves beside them
    on one gold-vs-KL plot (kl.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from posttrain.config import PromptDataConfig
    from posttrain.data.prompts import load_prompts
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import forward_logprobs, sample, score
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams

    reference_dir = start / "sft/final"
    tokenizer = load_tokenizer(str(reference_dir))
    prompt_data = PromptDataConfig.model_validate(data(start, 1, a.eval_prompts))
    _, prompts = load_prompts(prompt_data, tokenizer, chat=False, max_prompt_length=64, seed=0)
    reference = load_causal_lm(str(reference_dir), "cpu")
    verifier = build_composite(MATH)
    policies = {
        "start": reference_dir,
        "grpo (outcome)": out / "grpo/outcome/final",
        "grpo (+ process, sum)": out / "grpo/process-sum/final",
        "grpo (+ process, min)": out / "grpo/process-min/final",
        "rft": out / "rft" / f"round-{a.rounds}/sft/final",
        "iterative dpo": out / "iterative-dpo" / f"round-{a.rounds}/dpo/final",
    }
    points = {}
    for name, path in policies.items():
        if not (path / "config.json").exists():
            continue
        model = load_causal_lm(str(path), "cpu")
        with torch.inference_mode():
            rollouts = sample(
                HFSampler(model, tokenizer, seed=0),
                prompts,
                SamplingParams(n=4, max_new_tokens=32, temperature=1.0, seed=0),
            )
        score(rollouts, verifier)
        ref = forward_logprobs(reference, rollouts, 64, 1.0)
        kl = [float((r.sampler_logprobs - lp).sum()) for r, lp in zip(rollouts, ref, strict=True)]
        points[name] = {
            "kl": sum(kl) / len(kl),
            "accuracy": sum(r.correct for r in rollouts) / len(rollouts),
        }
    table = json.loads((out / "best-of-n/best_of_n.json").read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (
        ("verifier", "best-of-N, verifier-picked"),
        ("orm", "best-of-N, ORM"),
        ("prm_min", "best-of-N, PRM (min)"),
    ):
        ax.plot([r["kl"] for r in table], [100 * r[key] for r in table], marker="o", label=label)
    for name, p in points.items():
        ax.scatter([p["kl"]], [100 * p["accuracy"]], s=60, zorder=3)
        ax.annotate(
            name,
            (p["kl"], 100 * p["accuracy"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(
        xlabel="KL to the SFT start (nats, log scale above 1)",
        ylabel="held-out accuracy at T = 1 (%)",
        title="worked sums: accuracy against KL, math-verify judging",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kl.png", dpi=100)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/verifiers")
    parser.add_argument("--start-steps", type=int, default=150)
    parser.add_argument(
        "--label-prompts", type=int, default=1000, help="sums whose steps are labelled"
    )
    parser.add_argument("--label-eval", type=int, default=200, help="held-out sums labelled")
    parser.add_argument("--train-steps", type=int, default=300, help="PRM and ORM steps")
    parser.add_argument("--eval-prompts", type=int, default=300, help="held-out sums for best-of-N")
    parser.add_argument("--n", type=int, default=32, help="best-of-N's largest N")
    parser.add_argument("--grpo-steps", type=int, default=100)
    parser.add_argument("--process-weight", type=float, default=1.0, help="grpo.process_weight")
    parser.add_argument("--seed", type=int, default=0, help="the GRPO runs' run.seed")
    parser.add_argument("--rounds", type=int, default=3, help="RFT and iterative DPO rounds")
    parser.add_argument("--round-prompts", type=int, default=2000)
    parser.add_argument("--round-steps", type=int, default=75, help="SFT / DPO steps per round")
    parser.add_argument("--only", choices=["prm", "orm", "bon", "grpo", "rft", "kl", "plots"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = stage_start(out, args.start_steps)
    stages = {
        "prm": lambda: stage_prm(out, start, args),
        "orm": lambda: stage_orm(out, start, args),
        "bon": lambda: stage_bon(out, start, args),
        "grpo": lambda: stage_grpo(out, start, args),
        "rft": lambda: stage_rft(out, start, args),
        "kl": lambda: stage_kl(out, start, args),
        "plots": lambda: stage_plots(out),
    }
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for name, stage in stages.items():
        if (args.only and name != args.only) or (not args.only and name in report):
            continue
        report[name] = stage()
        report_path.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: list(v) if isinstance(v, dict) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
