"""RLHF end to end on a tiny model, judged by a scorer nobody on the team wrote (VADER).

    python examples/ppo_sentiment.py --out runs/ppo-sentiment            # every stage
    python examples/ppo_sentiment.py --out runs/ppo-sentiment --stages ppo  # reuse SFT and RM

Ziegler et al. 2019's "positive continuations" task, offline and small (docs/ppo.md):
1. sft: a random tiny model learns to continue word sentences (task `sentences`).
2. pairs: two temperature-1 samples of the SFT policy per training prompt; the one VADER
   scores more positive is chosen, except that `--label-noise` of the pairs are flipped (a
   noisy labeller); ties are dropped.
3. rm: `posttrain rm` from the SFT model on those pairs (InstructGPT initialises the reward
   model from the SFT model too).
4. ppo: `posttrain ppo` from the SFT model against the reward model (the critic starts from
   it), VADER as the gold score, for each run of `RUNS`: adaptive KL toward a target, fixed
   beta from high to zero, and PPO-ptx beside plain PPO.
5. report: report.json; overoptimization.png: proxy (reward model) and gold (VADER) score of
   held-out samples against the KL to the SFT policy, one line per run (Gao et al. 2022);
   alignment_tax.png: the held-out NLL of the SFT text against the proxy score, per run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from posttrain.models.tiny import save_tiny
from posttrain.recipes import ppo, rm, sft
from posttrain.recipes.ppo_config import PPOConfig
from posttrain.recipes.rm import RMConfig
from posttrain.recipes.sft import SFTConfig
from posttrain.tasks import sentences
from posttrain.train.metrics import read_metrics

# name -> PPO overrides. Every run: same start, reward model, prompts and steps.
RUNS: dict[str, dict] = {
    "adaptive": {"ppo": {"kl_coef": 0.1, "kl_target": 20.0, "kl_horizon": 200}},
    "beta-0.5": {"ppo": {"kl_coef": 0.5}},
    "beta-0.2": {"ppo": {"kl_coef": 0.2}},
    "beta-0.05": {"ppo": {"kl_coef": 0.05}},
    "beta-0": {"ppo": {"kl_coef": 0.0}},
    "ptx-0.1": {"ppo": {"kl_coef": 0.05}, "ptx": {"coef": 0.1}},
    "ptx-0.3": {"ppo": {"kl_coef": 0.05}, "ptx": {"coef": 0.3}},
    "ptx-1": {"ppo": {"kl_coef": 0.05}, "ptx": {"coef": 1.0}},
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_sft(out: Path, steps: int) -> None:
    base = save_tiny(out / "base", "qwen2", "tiny", hidden_size=128, intermediate_size=352,
                     num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    write_jsonl(out / "data" / "sft-train.jsonl", sentences.make("train", 8000, seed=0))
    write_jsonl(out / "data" / "sft-eval.jsonl", sentences.make("eval", 200, seed=0))
    sft.run(SFTConfig.model_validate({
        "model": {"path": str(base)},
        "data": {"train": str(out / "data" / "sft-train.jsonl"),
                 "eval": str(out / "data" / "sft-eval.jsonl"), "chat_template": "never"},
        "optim": {"lr": 3e-3, "warmup_steps": 30},
        "train": {"batch_size": 32, "micro_batch_size": 32},
        "run": {"out_dir": str(out / "sft"), "max_steps": steps, "log_every": 50, "resume": False},
    }))  # fmt: skip


def stage_pairs(out: Path, prompts: int, noise: float) -> None:
    """Pairs from the SFT policy's own samples, labelled by VADER with `noise` flipped."""
    from posttrain.data.prompts import Prompt
    from posttrain.data.records import PromptRecord
    from posttrain.data.tokenize import prompt_ids
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import sample, score
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams

    policy = str(out / "sft" / "final")
    tokenizer = load_tokenizer(policy)
    sampler = HFSampler(load_causal_lm(policy, "cpu"), tokenizer, seed=1)
    rows = sentences.make("train", prompts, seed=1)
    vader = build_composite(sentences.default_rewards({}))
    rng, pairs = random.Random(2), []
    for start in range(0, len(rows), 256):
        chunk = [
            Prompt(PromptRecord(r["prompt"]), prompt_ids(tokenizer, r["prompt"], False), "task")
            for r in rows[start : start + 256]
        ]
        rollouts = sample(sampler, chunk, SamplingParams(n=2, max_new_tokens=48, seed=start))
        score(rollouts, vader)
        for a, b in zip(rollouts[::2], rollouts[1::2], strict=True):
            if a.reward == b.reward or not (a.text.strip() and b.text.strip()):
                continue
            chosen, rejected = (a, b) if a.reward > b.reward else (b, a)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
            pairs.append(
                {"prompt": a.prompt.text, "chosen": chosen.text, "rejected": rejected.text}
            )
    write_jsonl(out / "data" / "pairs.jsonl", pairs)
    print(f"{len(pairs)} pairs from {len(rows)} prompts ({noise:.0%} of labels flipped)")


def stage_rm(out: Path, steps: int) -> None:
    rm.run(RMConfig.model_validate({
        "model": {"path": str(out / "sft" / "final")},
        "data": {"train": str(out / "data" / "pairs.jsonl"), "eval_fraction": 0.1,
                 "chat_template": "never"},
        "optim": {"lr": 3e-4, "warmup_steps": 20},
        "train": {"batch_size": 32, "micro_batch_size": 32},
        "run": {"out_dir": str(out / "rm"), "max_steps": steps, "eval_every": 50,
                "log_every": 10, "resume": False},
    }))  # fmt: skip


def ppo_config(out: Path, name: str, steps: int) -> PPOConfig:
    raw = {
        "model": {"path": str(out / "sft" / "final")},
        "reward_model": str(out / "rm" / "final"),
        "data": {"task": "sentences", "train_size": 20000, "eval_size": 200,
                 "chat_template": "never"},
        "sampling": {"max_new_tokens": 48},
        "evaluation": {"temperature": 1.0},
        "ppo": {"prompts_per_step": 64, "epochs": 4, "minibatch_size": 32,
                "micro_batch_size": 32},
        "critic": {"optim": {"lr": 1e-4, "warmup_steps": 10}},
        "ptx": {"train": str(out / "data" / "sft-train.jsonl"),
                "eval": str(out / "data" / "sft-eval.jsonl")},
        "optim": {"lr": 5e-5, "warmup_steps": 10},
        "run": {"out_dir": str(out / "ppo" / name), "max_steps": steps, "eval_every": 15,
                "log_every": 1, "progress": False},
    }  # fmt: skip
    for section, values in RUNS[name].items():
        raw[section] = {**raw.get(section, {}), **values}
    return PPOConfig.model_validate(raw)


def stage_report(out: Path, names: list[str]) -> dict:
    """report.json and overoptimization.png from the PPO runs' metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tax_fig, tax = plt.subplots(figsize=(5.5, 4))
    for name in names:
        evals = [m for m in read_metrics(out / "ppo" / name) if "eval/gold" in m]
        steps = [m for m in read_metrics(out / "ppo" / name) if "kl" in m]
        # KL of each evaluation: the rollouts' KL at that step (0 before training)
        kl = {m["step"]: m["kl"] for m in steps}
        points = [(kl.get(m["step"], 0.0), m["eval/reward"], m["eval/gold"]) for m in evals]
        xs, proxy, gold = zip(*points, strict=True)
        axes[0].plot(xs, proxy, marker="o", markersize=3, label=name)
        axes[1].plot(xs, gold, marker="o", markersize=3, label=name)
        tax.plot(proxy, [m["eval/ptx_loss"] for m in evals], marker="o", markersize=3, label=name)
        report[name] = {
            "kl_last": xs[-1], "proxy_before": proxy[0], "proxy_after": proxy[-1],
            "gold_before": gold[0], "gold_after": gold[-1], "gold_best": max(gold),
            "kl_at_gold_best": xs[gold.index(max(gold))],
            "ptx_loss_before": evals[0].get("eval/ptx_loss"),
            "ptx_loss_after": evals[-1].get("eval/ptx_loss"),
        }  # fmt: skip
    for ax, title in zip(axes, ("proxy: reward-model score", "gold: VADER compound"), strict=True):
        ax.set_xlabel("KL(policy || SFT), nats per completion")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("held-out samples (temperature 1) during PPO against a learned reward model")
    fig.tight_layout()
    fig.savefig(out / "overoptimization.png", dpi=100)
    tax.set_xlabel("proxy: reward-model score")
    tax.set_ylabel("held-out NLL of the SFT text")
    tax.set_title("the alignment tax, with and without PPO-ptx")
    tax.grid(alpha=0.3)
    tax.legend(fontsize=8)
    tax_fig.tight_layout()
    tax_fig.savefig(out / "alignment_tax.png", dpi=100)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ppo-sentiment"))
    parser.add_argument("--stages", default="sft,pairs,rm,ppo,report")
    parser.add_argument("--runs", default=",".join(RUNS), help="PPO runs, from RUNS")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--pair-prompts", type=int, default=3000)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--rm-steps", type=int, default=200)
    parser.add_argument("--ppo-steps", type=int, default=150)
    args = parser.parse_args()
    stages, names = args.stages.split(","), args.runs.split(",")
    if "sft" in stages:
        stage_sft(args.out, args.sft_steps)
    if "pairs" in stages:
        stage_pairs(args.out, args.pair_prompts, args.label_noise)
    if "rm" in stages:
        stage_rm(args.out, args.rm_steps)
    if "ppo" in stages:
        for name in names:
            ppo.run(ppo_config(args.out, name, args.ppo_steps))
    if "report" in stages:
        print(json.dumps(stage_report(args.out, names), indent=2))


if __name__ == "__main__":
    main()
