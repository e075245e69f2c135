"""posttrain rm vs TRL's RewardTrainer: preference pairs learned per second on K=4 rankings.

    python benchmarks/rm.py                 # tiny and small models, three variants
    python benchmarks/rm.py --quick         # smoke run: tiny model, a few steps
    python benchmarks/rm.py --sizes small --warmup 2 --steps 10

Uses the TRL virtualenv of `benchmarks/sft.py` (`benchmarks/.venv-trl`, created on first use).

Same work on both sides:
- One deterministic set of rankings: a chat prompt of 20-200 characters and K = 4 responses of
  20-300 (byte tokenizer: one token per character; ChatML adds 21 tokens), best first.
  posttrain reads them as ranking records. TRL's RewardTrainer takes pairs, so a TRL user gives
  it each ranking's 6 pairs as conversational prompt/chosen/rejected records; each TRL run
  checks its tokenized pairs against posttrain's tokens (same total).
- Random-weight qwen2 backbones from `posttrain.models.tiny.save_tiny` ("tiny": hidden 256 x 4
  layers, "small": 512 x 8) loaded as `AutoModelForSequenceClassification(num_labels=1)`,
  fp32, sdpa; `use_cpu=True, bf16=False` for TRL.
- 48 pairs per optimizer step: 8 rankings in micro-batches of 4 for posttrain; TRL: per-device
  batch 24 pairs x gradient accumulation 2. AdamW at lr 1e-5, cosine, clipping at 1.0, seed 0.

Variants, each in its own process with the same OMP_NUM_THREADS:
- posttrain: `posttrain rm` as a user runs it: each ranking's prompt computed once and its 4
  responses once each, packed without padding, the score head at the last tokens only.
- TRL default: RewardConfig's defaults (gradient checkpointing on, right padding).
- TRL tuned: gradient checkpointing off (RewardTrainer has no padding-free mode).

Measured: each process timestamps the end of every optimizer step (posttrain: a wrapper around
`Learner.step`; TRL: a callback). Throughput = pairs of steps W+1..W+K / wall time from the end
of step W to the end of step W+K, whole loop iterations included.

Roofline fraction = useful FLOP/s / the machine's fp32 matmul peak
(`benchmarks.roofline.measure_matmul_gflops`, 2048^2). Useful work is the least computation
that gives a ranking's 4 scores: its prompt (p tokens) once and each response (r_k tokens)
once, attending to the prompt and its own past. Forward + backward (3x the forward):
    6 N (p + sum_k r_k) + 12 L A (p (p + 1) / 2 + sum_k (r_k p + r_k (r_k + 1) / 2))
with N the non-embedding parameters, L layers, A = heads x head_dim (4 L A FLOPs per
query-key pair in the forward); the score head's 2 d FLOPs per response are negligible. The
same count serves both frameworks: recomputing the prompt for every pair, padding and
checkpoint recomputation are work, not useful work. Pairs are each ranking's 6.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
VARIANTS = ("posttrain", "trl-default", "trl-tuned")
K = 4
PAIRS_PER_RANKING = K * (K - 1) // 2
MAX_LENGTH = 1024


def make_rankings(count: int, seed: int) -> list[dict]:
    """Ranking records (prompt, K responses), the same for the same arguments."""
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    from benchmarks.sft import ASKS, _sentences

    rng = random.Random(seed)
    return [
        {
            "prompt": _sentences(rng, rng.randint(20, 200), rng.choice(ASKS) + " "),
            "responses": [_sentences(rng, rng.randint(20, 300)) for _ in range(K)],
        }
        for _ in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Workers --------------------------------------------------------------------------------------


def posttrain_worker(spec: dict) -> dict:
    """`posttrain rm` through its CLI, with `Learner.step` wrapped to timestamp each step."""
    from posttrain.cli import main as posttrain_main
    from posttrain.train.learner import Learner

    marks: list[tuple[float, int]] = []
    step = Learner.step

    def timed_step(self, micro_batches, weights, loss_fn):
        metrics = step(self, micro_batches, weights, loss_fn)
        marks.append((time.perf_counter(), sum(len(b.order_better) for b in micro_batches)))
        return metrics

    Learner.step = timed_step
    code = posttrain_main(
        [
            "rm", f"model.path={spec['model']}", "model.dtype=float32",
            f"data.train={spec['train']}", f"data.eval={spec['eval']}",
            f"data.max_length={MAX_LENGTH}", f"optim.lr={spec['lr']}", "optim.schedule=cosine",
            f"run.max_steps={spec['steps']}", f"train.batch_size={spec['rankings_per_step']}",
            f"train.micro_batch_size={spec['rankings_per_step'] // 2}", "run.seed=0",
            f"run.out_dir={spec['out_dir']}", "run.resume=false", "run.progress=false",
        ]
    )  # fmt: skip
    if code:
        raise SystemExit(f"posttrain rm exited with {code}")
    return {"marks": marks}


def trl_worker(spec: dict) -> dict:
    """TRL's RewardTrainer on every ranking's 6 pairs; a callback timestamps steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rankings = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pairs = [
        {"prompt": user(r["prompt"]), "chosen": assistant(r["responses"][i]),
         "rejected": assistant(r["responses"][j])}
        for r in rankings for i in range(K) for j in range(i + 1, K)
    ]  # fmt: skip
    tuning = dict(gradient_checkpointing=False) if spec["variant"] == "trl-tuned" else {}
    pairs_per_step = spec["rankings_per_step"] * PAIRS_PER_RANKING
    config = RewardConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, max_steps=spec["steps"],
        per_device_train_batch_size=pairs_per_step // 2, gradient_accumulation_steps=2,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", seed=0, report_to="none",
        save_strategy="no", disable_tqdm=True, max_length=MAX_LENGTH, **tuning,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks: list[tuple[float, int]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), pairs_per_step))

    trainer = RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer, callbacks=[StepTimer()],
    )  # fmt: skip
    prepared = trainer.train_dataset
    chosen, rejected = prepared["chosen_ids"], prepared["rejected_ids"]
    tokens = sum(len(a) + len(b) for a, b in zip(chosen, rejected, strict=True))
    trainer.train()
    return {
        "marks": marks,
        "pair_tokens": tokens,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    }


def worker_main(name: str, spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    result = posttrain_worker(spec) if name == "posttrain" else trl_worker(spec)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# Orchestration ------------------------------------------------------------------------------


def run_variant(python: Path, variant: str, spec: dict, work: Path, threads: int) -> dict:
    name = spec["name"]
    spec = {
        **spec,
        "variant": variant,
        "out_dir": str(work / name),
        "result": str(work / f"{name}.json"),
    }
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    worker = "posttrain" if variant == "posttrain" else "trl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log_path = work / f"{name}.log"
    with log_path.open("w") as log:
        command = [python, __file__, "--worker", worker, "--spec", spec_path]
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {code}: {tail[0][:200]} (log: {log_path})"}
    return json.loads(Path(spec["result"]).read_text())


def steady_rate(marks: list, warmup: int) -> tuple[float, float]:
    """(pairs/s, s/step) over the steps after `warmup`, from end-of-step timestamps."""
    window = marks[warmup - 1 :]
    seconds = window[-1][0] - window[0][0]
    return sum(n for _, n in window[1:]) / seconds, seconds / (len(window) - 1)


def useful_flops_per_pair(size: str, comparisons: list) -> float:
    """The docstring's FLOP count per ranking, divided by its 6 pairs, averaged."""
    from posttrain.models.tiny import build_model

    c = build_model("qwen2", size).config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn_width = c.num_attention_heads * head_dim
    model = build_model("qwen2", size)
    non_embedding = sum(p.numel() for p in model.parameters()) - c.vocab_size * c.hidden_size
    flops = 0.0
    for comparison in comparisons:
        p, rs = len(comparison.prompt_ids), [len(r) for r in comparison.response_ids]
        query_key = p * (p + 1) / 2 + sum(r * p + r * (r + 1) / 2 for r in rs)
        flops += (
            6 * non_embedding * (p + sum(rs)) + 12 * c.num_hidden_layers * attn_width * query_key
        )
    return flops / (len(comparisons) * PAIRS_PER_RANKING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--rankings-per-step", type=int, default=8, help="K=4 rankings per step")
    parser.add_argument("--rankings", type=int, default=256, help="rankings to generate")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-rm")
    parser.add_argument("--trl-venv", type=Path, default=TRL_VENV)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 + 2 steps")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    if args.quick:
        args.sizes, args.warmup, args.steps, args.rankings = ["tiny"], 1, 2, 64
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the window starts at the end of a step")

    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.roofline import measure_matmul_gflops
    from benchmarks.sft import ensure_trl_venv
    from posttrain.data.records import RankingRecord
    from posttrain.data.reward import RewardEncoder, tokenize_comparisons
    from posttrain.models.tiny import build_tokenizer, save_tiny

    trl_python = ensure_trl_venv(args.trl_venv) if args.variants != ["posttrain"] else None
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rankings = make_rankings(args.rankings, seed=0)
    train = write_jsonl(work / "train.jsonl", rankings)
    evals = write_jsonl(work / "eval.jsonl", make_rankings(4, seed=1))
    comparisons = tokenize_comparisons(
        RewardEncoder(build_tokenizer(), decoder=True, chat=True),
        [RankingRecord(r["prompt"], r["responses"]) for r in rankings],
        source=str(train), heads=[], max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH,
    )  # fmt: skip
    # What a pair costs when each is run as its own two sequences (TRL), in tokens.
    pair_tokens = sum(
        2 * len(c.prompt_ids) + len(c.response_ids[i]) + len(c.response_ids[j])
        for c in comparisons
        for i, j in c.order
    )
    shared_tokens = sum(len(c.prompt_ids) + sum(map(len, c.response_ids)) for c in comparisons)

    torch.set_num_threads(args.threads)
    peak = measure_matmul_gflops(2048)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    print(f"fp32 matmul roofline (2048^2): {peak:.1f} GFLOP/s")
    print(
        f"{len(rankings)} rankings of K={K} ({PAIRS_PER_RANKING} pairs each); "
        f"{args.rankings_per_step * PAIRS_PER_RANKING} pairs per step; tokens per ranking: "
        f"{shared_tokens / len(rankings):.0f} computed once each, "
        f"{pair_tokens / len(rankings):.0f} as separate pairs; "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )

    results: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        model_dir = save_tiny(work / f"model-{size}", "qwen2", size)
        flops_per_pair = useful_flops_per_pair(size, comparisons)
        results[size] = {}
        for variant in args.variants:
            spec = dict(
                name=f"{size}-{variant}", model=str(model_dir), train=str(train),
                eval=str(evals), steps=args.warmup + args.steps,
                rankings_per_step=args.rankings_per_step, lr=args.lr,
            )  # fmt: skip
            python = Path(sys.executable) if variant == "posttrain" else trl_python
            began = time.perf_counter()
            result = run_variant(python, variant, spec, work, args.threads)
            result["wall_s"] = time.perf_counter() - began
            if "error" not in result:
                if result.get("pair_tokens", pair_tokens) != pair_tokens:
                    raise SystemExit(
                        f"{variant} tokenized the pairs differently: {result['pair_tokens']} "
                        f"tokens, posttrain's tokenization gives {pair_tokens}"
                    )
                rate, step_s = steady_rate(result["marks"], args.warmup)
                result.update(pairs_per_s=rate, step_s=step_s)
                result["roofline"] = rate * flops_per_pair / (peak * 1e9)
            results[size][variant] = result
            status = result.get("error") or f"{result['pairs_per_s']:.1f} pairs/s"
            print(f"  {size} {variant}: {status} ({result['wall_s']:.0f} s)", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print()
    header = (
        f"{'model':6} {'variant':12} {'pairs/s':>8} {'s/step':>7} {'peak RSS':>9} "
        f"{'%roofline':>9} {'posttrain speedup':>17}"
    )
    print(header)
    print("-" * len(header))
    for size, by_variant in results.items():
        ours = by_variant.get("posttrain", {})
        for variant, r in by_variant.items():
            if "error" in r:
                print(f"{size:6} {variant:12} {r['error']}")
                continue
            speedup = ours.get("pairs_per_s", float("nan")) / r["pairs_per_s"]
            print(
                f"{size:6} {variant:12} {r['pairs_per_s']:8.1f} {r['step_s']:7.2f} "
                f"{r['peak_rss_mb']:7.0f}MB {100 * r['roofline']:8.1f}% {speedup:16.2f}x"
            )
    print(f"\nload average at the end: {os.getloadavg()}; results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
