"""`posttrain arithmetic`: a tiny model learns arithmetic by SFT, measured before and after; the
start of the worked-sums examples (GRPO, PPO, iterative DPO).

Builds a random tiny causal LM and tokenizer (offline), generates a train/held-out split of
`a+b=` / `a-b=` problems with disjoint operand pairs, measures held-out loss and exact-match
accuracy of greedy answers, fine-tunes with the SFT recipe, and measures again. Everything it made
is in `out_dir`: the base model, the data, the SFT run (metrics, final model) and `report.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, Section, TrainConfig
from posttrain.data.loading import load_records
from posttrain.data.prompts import Prompt, tokenize_prompts
from posttrain.eval.heldout import evaluate_prompts
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.models.tiny import save_tiny
from posttrain.recipes import sft
from posttrain.rewards import build_composite
from posttrain.rollout import HFSampler, SamplingParams
from posttrain.tasks import TASKS, arithmetic
from posttrain.train.distributed import pick_device


class ArithmeticConfig(Section):
    out_dir: str = "runs/arithmetic"
    """Where the model, data, run and report go."""
    arch: Literal["qwen2", "llama"] = "qwen2"
    """Architecture of the tiny model."""
    size: Literal["tiny", "small"] = "tiny"
    """tiny: ~3M parameters; small: ~25M."""
    train_examples: int = 18000
    """Generated training problems."""
    eval_examples: int = 500
    """Held-out problems (operand pairs never seen in training)."""
    max_operand: int = 99
    """Largest operand of a problem."""
    operators: str = "+-"
    """Operators of the problems: '+-' or '+'."""
    worked: bool = False
    """Demonstrations work the sum out column by column before the answer
    (`7+8=15, 3+0+1=4, 45`; needs operators='+'): the GRPO demo's start (docs/grpo.md)."""
    steps: int = 1500
    """SFT optimizer steps."""
    batch_size: int = 64
    """Sequences per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    seed: int = 0
    """Seed for the model, the data and the run."""


def _accuracy(model_dir: Path, prompts: list[Prompt], reward, device) -> float:
    """Held-out accuracy of greedy answers (the evaluator every online recipe uses)."""
    model = load_causal_lm(str(model_dir), device)
    sampler = HFSampler(model, load_tokenizer(str(model_dir)))
    # A worked solution takes up to 23 tokens.
    result = evaluate_prompts(sampler, prompts, reward, SamplingParams.greedy(32))
    return result.metrics["eval/accuracy"]


def run(cfg: ArithmeticConfig) -> dict:
    began = time.time()
    out = Path(cfg.out_dir)
    console = Console()
    console.print(f"[bold]posttrain arithmetic[/] -> {out}")
    base = save_tiny(out / "base_model", cfg.arch, cfg.size, seed=cfg.seed)
    train_rows, eval_rows = arithmetic.make_split(
        cfg.train_examples, cfg.eval_examples, max_operand=cfg.max_operand, seed=cfg.seed,
        operators=cfg.operators, worked=cfg.worked,
    )  # fmt: skip
    train_path = arithmetic.write_jsonl(train_rows, out / "data" / "train.jsonl")
    eval_path = arithmetic.write_jsonl(eval_rows, out / "data" / "eval.jsonl")
    tokenizer = load_tokenizer(str(base))
    held_out = tokenize_prompts(
        tokenizer, load_records(eval_path, "prompt"), source=str(eval_path), chat=False,
        max_length=64,
    )  # fmt: skip
    reward = build_composite(TASKS["arithmetic"].default_rewards({"worked": cfg.worked}))
    device = pick_device("auto")
    accuracy_before = _accuracy(base, held_out, reward, device)
    console.print(
        f"built {cfg.size} {cfg.arch}; held-out accuracy before training: {accuracy_before:.1%}"
    )

    summary = sft.run(
        sft.SFTConfig(
            model=ModelConfig(path=str(base)),
            data=DataConfig(train=str(train_path), eval=str(eval_path), chat_template="never"),
            optim=OptimConfig(lr=cfg.lr, warmup_steps=50),
            train=TrainConfig(batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size),
            run=RunConfig(
                out_dir=str(out / "sft"),
                seed=cfg.seed,
                max_steps=cfg.steps,
                eval_every=max(1, cfg.steps // 5),
                log_every=10,
                resume=False,
            ),
        )
    )
    accuracy_after = _accuracy(out / "sft" / "final", held_out, reward, device)
    report = {
        "eval_loss_before": summary["eval_before"]["eval/loss"],
        "eval_loss_after": summary["eval_after"]["eval/loss"],
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "eval_examples": len(held_out),
        "seconds": round(time.time() - began, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = Table(title=f"held-out arithmetic ({len(held_out)} problems never seen in training)")
    for column in ("", "before SFT", "after SFT"):
        table.add_column(column)
    table.add_row(
        "loss (answer tokens)",
        f"{report['eval_loss_before']:.3f}",
        f"{report['eval_loss_after']:.3f}",
    )
    table.add_row("exact-match accuracy", f"{accuracy_before:.1%}", f"{accuracy_after:.1%}")
    console.print(table)
    console.print(f"done in {report['seconds']:.0f} s; final model: {out / 'sft' / 'final'}")
    return report
