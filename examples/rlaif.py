"""RLAIF in the small: reward models from an AI judge's verdicts, against one from gold labels.

    python examples/rlaif.py --out runs/rlaif          # ~5 minutes on 2 CPU cores

1. sft: the quickstart's SFT stage (`posttrain pipeline stages=[sft]`): a tiny model that
   continues word sentences.
2. label (`posttrain label`), three times on the same sampled responses (4 per prompt, every
   pair judged): by the gold rule itself (VADER, no noise); by a noisy, position-biased
   judge (a scripted judge behind a real OpenAI-compatible HTTP endpoint: Bradley-Terry noise
   0.3 on VADER, and 30% of the time it answers "A" whatever it reads) asked in both orders;
   and by the same judge asked in one order only.
3. rm (`posttrain rm`) on each label file, same steps and seed.
4. Each label file's agreement with the gold rule; held-out pairs (two samples of the SFT
   policy for each held-out prompt, labelled by the gold rule, ties dropped) and each reward
   model's accuracy on them.

Writes `report.json` in `--out`. docs/judges.md has the measured numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain.judges.scripted import ScriptedJudge, serve_scripted
from posttrain.recipes import label, pipeline, rm

GOLD = [{"name": "sentiment"}]
LABELLERS = {  # name -> (scripted judge, ask both orders)
    "gold": (dict(noise=0.0, position_bias=0.0), True),
    "judge-both-orders": (dict(noise=0.3, position_bias=0.3), True),
    "judge-one-order": (dict(noise=0.3, position_bias=0.3), False),
}


def held_out_pairs(policy: Path, prompts: int, seed: int) -> list[dict]:
    """Gold-labelled pairs of the policy's samples on held-out prompts (ties dropped)."""
    from posttrain.config import PromptDataConfig
    from posttrain.data.prompts import load_prompts
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import sample
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams

    tokenizer = load_tokenizer(str(policy))
    data = PromptDataConfig(
        task="sentences", train_size=1, eval_size=prompts, chat_template="never"
    )
    _, held_out = load_prompts(data, tokenizer, chat=False, max_prompt_length=64, seed=seed)
    sampler = HFSampler(load_causal_lm(str(policy), "cpu"), tokenizer, seed=seed)
    rollouts = sample(sampler, held_out, SamplingParams(n=2, max_new_tokens=48, seed=seed))
    gold = build_composite(GOLD)
    scores = gold([r.prompt.text for r in rollouts], [r.text for r in rollouts]).scores
    pairs = []
    for k in range(0, len(rollouts), 2):
        a, b = rollouts[k], rollouts[k + 1]
        if scores[k] != scores[k + 1] and a.text.strip() and b.text.strip():
            first = scores[k] > scores[k + 1]
            pairs.append({"prompt": a.prompt.text, "chosen": (a if first else b).text,
                          "rejected": (b if first else a).text})  # fmt: skip
    return pairs


def label_accuracy(path: str) -> float:
    """The fraction of a label file's pairs the gold rule orders the same way (over the pairs
    whose gold scores differ)."""
    from posttrain.rewards import build_composite

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    gold = build_composite(GOLD)
    prompts = [r["prompt"] for r in rows]
    chosen = gold(prompts, [r["chosen"] for r in rows]).scores
    rejected = gold(prompts, [r["rejected"] for r in rows]).scores
    decided = [c > r for c, r in zip(chosen, rejected, strict=True) if c != r]
    return sum(decided) / len(decided)


def accuracy(model: Path, pairs: list[dict]) -> float:
    from posttrain.rewards.reward_model import RewardModelScorer

    scorer = RewardModelScorer(str(model), device="cpu", chat_template="never")
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs]).scores
    rejected = scorer(prompts, [p["rejected"] for p in pairs]).scores
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rlaif"))
    parser.add_argument("--prompts", type=int, default=1000, help="training prompts labelled")
    parser.add_argument("--rm-steps", type=int, default=150)
    parser.add_argument("--held-out", type=int, default=400, help="held-out prompts")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out
    pipeline.run(pipeline.PipelineConfig.model_validate(
        {"out_dir": str(out), "stages": ["sft"], "seed": args.seed, "data": {"eval_size": 16},
         "sft": {"run": {"max_steps": args.sft_steps}}}))  # fmt: skip
    policy = out / "sft" / "final"
    report: dict = {}
    for name, (behaviour, both_orders) in LABELLERS.items():
        judge = ScriptedJudge(rule=GOLD, seed=args.seed, **behaviour)
        with serve_scripted(judge) as url:
            summary = label.run(label.LabelConfig.model_validate({
                "model": {"path": str(policy)},
                "data": {"task": "sentences", "train_size": args.prompts, "chat_template": "never"},
                "sampling": {"max_new_tokens": 48}, "responses": 4,
                "judge": {"kind": "pairwise", "base_url": url, "both_orders": both_orders,
                          "concurrency": 8},
                "run": {"out_dir": str(out / "label" / name), "seed": args.seed},
            }))  # fmt: skip
        rm.run(rm.RMConfig.model_validate({
            "model": {"path": str(policy)},
            "data": {"train": summary["file"], "eval_fraction": 0.05, "chat_template": "never"},
            "optim": {"lr": 3e-4, "warmup_steps": 20},
            "train": {"batch_size": 32, "micro_batch_size": 32},
            "run": {"out_dir": str(out / "rm" / name), "max_steps": args.rm_steps,
                    "eval_every": 0, "log_every": 10, "seed": args.seed, "progress": False},
        }))  # fmt: skip
        report[name] = {k: summary[k] for k in ("pairs", "comparisons", "ties", "order_agreement")}
        report[name]["label_accuracy"] = label_accuracy(summary["file"])
    pairs = held_out_pairs(policy, args.held_out, args.seed + 1)
    for name in LABELLERS:
        report[name]["held_out_accuracy"] = accuracy(out / "rm" / name / "final", pairs)
    report["held_out_pairs"] = len(pairs)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
