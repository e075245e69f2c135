"""Tool use, measured: a tiny model that cannot multiply three-digit numbers in its head learns by
GRPO to call a calculator, judged by math-verify on held-out products; the same RL without the
tool is the control.

    python examples/tools.py --out runs/tools           # about 30 minutes on 2 CPU cores
    python examples/tools.py --out runs/tools --only rl  # one stage (its inputs exist)

Stages (each skipped when its output exists):
- data: products `a*b=` of three-digit operands; RL prompts (train) and held-out prompts with
  operand pairs never seen in either order; SFT demonstrations on other pairs, a share
  (`--tool-share`) calling the calculator and reading its answer, the rest answering directly
  with a guess (`about 264000`): the start's greedy answer is a guess, its samples call the
  tool as often as the demonstrations did.
- sft: a tiny random model (`posttrain tiny-model`'s qwen2) fine-tuned on the demonstrations
  for `--sft-steps` steps: it learns the call format and to copy, not to multiply.
- rl: `posttrain grpo` with examples/tools.yaml's settings (`--steps` steps) with the
  calculator, and the same without an environment (the control: the model's calls are then
  plain text it must complete itself).
- eval: the start and each RL run's final model on the held-out products, greedy and at
  T = 1 (4 samples each), with the calculator and without it: accuracy, calls per trajectory,
  call success, accuracy with and without a call (report.json's "eval", docs/tools.md's table).
- plots: held-out accuracy at T = 1 (examples/tools.yaml's evaluation), the sampled
  trajectories' share with a call and the share of calls that worked, by step (tools.png).

Writes `report.json` in `--out`; docs/tools.md has the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from posttrain.config import load_config

CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'


def stage_data(out: Path, a: argparse.Namespace) -> None:
    from posttrain.tools import ToolEnvironment, build_tools

    calculator = ToolEnvironment(build_tools(["calculator"]))  # writes the demos' responses
    rng = random.Random(a.seed)
    pairs = {(x, y) for x in range(100, 1000) for y in range(100, 1000) if x <= y}
    chosen = rng.sample(sorted(pairs), a.rl_prompts + a.eval_prompts + a.demos)
    held_out, train, demos = (
        chosen[: a.eval_prompts],
        chosen[a.eval_prompts : a.eval_prompts + a.rl_prompts],
        chosen[a.eval_prompts + a.rl_prompts :],
    )

    def ordered(pair: tuple[int, int]) -> tuple[int, int]:
        return pair if rng.random() < 0.5 else pair[::-1]

    def prompt_row(pair: tuple[int, int]) -> dict:
        x, y = ordered(pair)
        return {"prompt": f"{x}*{y}=", "answer": str(x * y)}

    def demo_row(pair: tuple[int, int]) -> dict:
        x, y = ordered(pair)
        if rng.random() >= a.tool_share:  # answers directly: a guess of the right length
            guess = rng.randrange(10 ** (len(str(x * y)) - 1), 10 ** len(str(x * y)))
            return {"prompt": f"{x}*{y}=", "completion": f"about {guess}"}
        call = CALL.format(f"{x}*{y}")
        response = calculator.step(call).text  # what the environment appends during RL
        return {"prompt": f"{x}*{y}=", "completion": call + response + str(x * y)}

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("rl-train", [prompt_row(p) for p in train]),
        ("rl-eval", [prompt_row(p) for p in held_out]),
        ("sft", [demo_row(p) for p in demos]),
    ):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage_sft(out: Path, a: argparse.Namespace) -> dict:
    from posttrain.models.tiny import save_tiny
    from posttrain.recipes import sft

    base = save_tiny(out / "base_model", "qwen2", "tiny", seed=a.seed)
    cfg = sft.SFTConfig.model_validate({
        "model": {"path": str(base)},
        "data": {"train": str(out / "data/sft.jsonl"), "eval_fraction": 0.05,
                 "chat_template": "never", "max_length": 160},
        "optim": {"lr": a.sft_lr, "warmup_steps": 20},
        "train": {"batch_size": 32, "micro_batch_size": 32},
        "run": {"out_dir": str(out / "sft"), "max_steps": a.sft_steps, "eval_every": 50,
                "log_every": 10, "seed": a.seed},
    })  # fmt: skip
    return sft.run(cfg)


def stage_rl(out: Path, a: argparse.Namespace) -> dict:
    from posttrain.recipes import grpo

    results = {}
    for name, tools in (("calculator", "[calculator]"), ("no-tool", "[]")):
        cfg = load_config(grpo.GRPOConfig, "examples/tools.yaml", [
            f"model.path={out / 'sft/final'}", f"data.train={out / 'data/rl-train.jsonl'}",
            f"data.eval={out / 'data/rl-eval.jsonl'}", f"environment.tools={tools}",
            f"run.out_dir={out / 'rl' / name}", f"run.max_steps={a.steps}", "run.save_every=0",
            f"run.seed={a.seed}",
        ])  # fmt: skip
        results[name] = grpo.run(cfg)
    return results


def stage_eval(out: Path, a: argparse.Namespace) -> dict:
    """Held-out accuracy and tool use of the start and of each RL run's final model, greedy and
    sampled, each with and without the calculator."""
    import torch

    from posttrain.config import EnvironmentConfig, PromptDataConfig, SamplingConfig
    from posttrain.data.prompts import load_prompts
    from posttrain.eval.heldout import evaluate_prompts
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.recipes.grpo_config import GRPOConfig
    from posttrain.rewards import build_composite
    from posttrain.rollout import SamplingParams, build_sampler

    cfg = load_config(GRPOConfig, "examples/tools.yaml", [])
    tokenizer = load_tokenizer(str(out / "sft/final"))
    data = PromptDataConfig(train=str(out / "data/rl-train.jsonl"), train_size=1,
                            eval=str(out / "data/rl-eval.jsonl"), eval_size=a.eval_prompts,
                            chat_template="never")  # fmt: skip
    _, prompts = load_prompts(data, tokenizer, chat=False, max_prompt_length=64, seed=0)
    reward = build_composite(cfg.rewards)
    sampling = SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens)
    decodings = {
        "greedy": SamplingParams.greedy(sampling.max_new_tokens),
        "T=1": SamplingParams(n=4, max_new_tokens=sampling.max_new_tokens, seed=0),
    }
    models = {"start": out / "sft/final", **{
        f"grpo {run.name}": run / "final" for run in sorted((out / "rl").glob("*"))
    }}  # fmt: skip
    table = {}
    for name, path in models.items():
        if not (path / "config.json").exists():
            continue
        model = load_causal_lm(str(path), "cpu")
        for tools in ("calculator", "none"):
            environment = cfg.environment if tools == "calculator" else EnvironmentConfig()
            sampler = build_sampler(sampling, model, tokenizer, a.seed, environment)
            for decoding, params in decodings.items():
                with torch.inference_mode():
                    metrics = evaluate_prompts(sampler, prompts, reward, params).metrics
                table[f"{name} | tool: {tools} | {decoding}"] = metrics
                print(name, tools, decoding, round(metrics["eval/accuracy"], 3))
    return table


def stage_plots(out: Path) -> dict:
    """tools.png: held-out accuracy at T = 1, and the sampled trajectories' calls and call
    success, by step, with and without the calculator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.train.metrics import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("eval/accuracy", "held-out accuracy at T = 1 (%)", 100),
        ("tools/with_call", "sampled trajectories with a call (%)", 100),
        ("tools/call_success", "calls that worked (%)", 100),
    )
    for run_dir in sorted((out / "rl").glob("*/metrics.jsonl")):
        metrics = read_metrics(run_dir.parent)
        for ax, (key, label, scale) in zip(axes, panels, strict=True):
            points = [(m["step"], scale * m[key]) for m in metrics if m.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=run_dir.parent.name, marker=".")
            ax.set(xlabel="step", ylabel=label)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tools.png", dpi=100)
    plt.close(fig)
    return {"tools": str(out / "tools.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tools"))
    parser.add_argument("--only", default="data,sft,rl,eval,plots", help="comma-separated stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demos", type=int, default=2000, help="SFT demonstrations")
    parser.add_argument("--tool-share", type=float, default=0.4, help="demonstrations that call")
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--rl-prompts", type=int, default=5000)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps")
    a = parser.parse_args()
    stages = a.only.split(",")
    out = a.out
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if "data" in stages and not (out / "data/sft.jsonl").exists():
        stage_data(out, a)
    if "sft" in stages and not (out / "sft/final").exists():
        report["sft"] = stage_sft(out, a)
    if "rl" in stages:
        report["rl"] = stage_rl(out, a)
    if "eval" in stages:
        report["eval"] = stage_eval(out, a)
    if "plots" in stages:
        report["plots"] = stage_plots(out)
    out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v.get("eval_after", v) if isinstance(v, dict) else v
                      for k, v in report.get("rl", {}).items()}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
