"""posttrain SFT vs TRL's SFTTrainer: training tokens per second on the same models and data.

    python benchmarks/sft.py                # tiny and small models, three variants (~8 min)
    python benchmarks/sft.py --quick        # smoke run: tiny model, a few steps
    python benchmarks/sft.py --sizes small --warmup 2 --steps 12

The first run creates `benchmarks/.venv-trl` (git-ignored) with torch==2.13.0 (CPU wheel, pinned
first) and trl==1.16.0, which brings its own transformers.

Same work on both sides:
- One deterministic set of chat records: prompts of 20-200 characters, completions of 20-300
  (the byte tokenizer gives one token per character; the ChatML template adds 21 tokens).
  posttrain reads them as prompt/completion strings; TRL gets them as conversational
  prompt-completion records. Both render the same ChatML tokens and train on the completion
  only (TRL's default for prompt-completion data: `completion_only_loss=None`); each TRL run
  checks its tokenized dataset against posttrain's (total tokens and targets must match).
- Random-weight qwen2 models from `posttrain.models.tiny.save_tiny` ("tiny": hidden 256 x 4
  layers, "small": hidden 512 x 8 layers), fp32, sdpa attention, `use_cpu=True, bf16=False`
  for TRL.
- 16 sequences per optimizer step in micro-batches of 8 (TRL: per-device batch 8 x gradient
  accumulation 2), max length 1024 (no sequence reaches it), AdamW at lr 1e-4 with a cosine
  schedule, no warmup, gradient clipping at 1.0, seed 0.

Variants, each in its own process with OMP_NUM_THREADS set for both:
- posttrain: `posttrain sft` as a user runs it (packed padding-free rows attended one
  sequence at a time by `posttrain.models.packed_attention`, output head on answer positions
  only, fused AdamW).
- TRL default: the SFTConfig defaults a user gets: right padding to the longest sequence in
  the micro-batch, gradient checkpointing on, fused AdamW.
- TRL tuned: gradient checkpointing off and `padding_free=True` (which, without packing,
  needs `max_length=None`); on CPU with sdpa, transformers reads the restarting position ids
  as one block-diagonal mask over the whole packed row.

Measured: each process timestamps the end of every optimizer step and counts the real tokens
it trained (prompt + completion + template tokens; no padding): posttrain through a wrapper
around `Learner.step` (timing only, nothing changed), TRL through a callback reading its own
`num_tokens` counter (attention-mask sum, or the packed row length when padding-free).
Throughput = tokens of steps W+1..W+K / wall time from the end of step W to the end of step
W+K: whole loop iterations, data collation, logging and optimizer included. Peak memory is
the process's peak RSS (`ru_maxrss`).

Roofline fraction = useful FLOP/s / the machine's fp32 matmul peak
(`benchmarks.roofline.measure_matmul_gflops`, 2048^2). Useful FLOPs of a sequence of n
tokens with k answer targets, forward + backward (x3 the forward):
    6 * N * n  +  6 * L * A * n * (n + 1)  +  6 * d * V * k
with N the non-embedding parameters, L layers, A = heads x head_dim (causal attention: token
i attends to i keys, 4 * L * A FLOPs per query-key pair in the forward, n (n + 1) / 2 pairs),
d the hidden size and V the vocabulary (output head on answer positions only). The same
formula counts both frameworks: padding, masked attention blocks and recomputation under
gradient checkpointing are work, but not useful work. The per-token average over the dataset
times tokens/s gives useful FLOP/s.
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
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; anything else downloads a CUDA build
TRL_PIN = "trl==1.16.0"
VARIANTS = ("posttrain", "trl-default", "trl-tuned")
MAX_LENGTH = 1024

# Data ----------------------------------------------------------------------------------------

ASKS = [
    "Explain", "Summarize", "Give three tips on", "How do I debug", "Compare",
    "Write a short note about", "What is the role of", "Describe a test plan for",
]  # fmt: skip
WORDS = [
    "the", "model", "data", "training", "loss", "batch", "token", "gradient", "memory", "kernel",
    "attention", "layer", "weight", "learning", "rate", "schedule", "optimizer", "step",
    "sequence", "prompt", "answer", "reward", "policy", "value", "cache", "thread", "core",
    "matrix", "vector", "output", "input", "length", "padding", "mask", "eval", "metric",
    "checkpoint", "run", "user", "system", "and", "of", "to", "in", "for", "with", "on", "a",
    "an", "is", "that", "this", "it", "by", "from", "as", "small", "large", "fast", "slow",
    "simple", "stable", "noisy", "better", "worse", "first", "last", "each", "every", "often",
    "rarely",
]  # fmt: skip


def _sentences(rng: random.Random, length: int, start: str = "") -> str:
    """Plausible-looking text of at most `length` characters, built word by word."""
    text, since_stop = start, 0
    while True:
        word = rng.choice(WORDS)
        if not text or text.endswith(". "):
            word = word.capitalize()
        piece = word if not text or text.endswith(" ") else " " + word
        since_stop += 1
        if since_stop >= rng.randint(6, 14):
            piece, since_stop = piece + ".", 0
        if len(text) + len(piece) > length:
            return text.rstrip() or word[:length]
        text += piece + (" " if piece.endswith(".") else "")


def make_records(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion records of varied length, the same for the same arguments."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = _sentences(rng, rng.randint(20, 200), rng.choice(ASKS) + " ")
        completion = _sentences(rng, rng.randint(20, 300))
        records.append({"prompt": prompt, "completion": completion})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Workers: one process per variant; each returns step timestamps and tokens ------------------


def posttrain_worker(spec: dict) -> dict:
    """`posttrain sft` through its CLI, with `Learner.step` wrapped to timestamp each step."""
    from posttrain.cli import main as posttrain_main
    from posttrain.train.learner import Learner

    marks: list[tuple[float, int]] = []
    step = Learner.step

    def timed_step(self, micro_batches, weights, loss_fn):
        metrics = step(self, micro_batches, weights, loss_fn)
        tokens = sum(
            b.input_ids.numel() if b.packed else int(b.attention_mask.sum()) for b in micro_batches
        )
        marks.append((time.perf_counter(), tokens))
        return metrics

    Learner.step = timed_step
    code = posttrain_main(
        [
            "sft",
            f"model.path={spec['model']}",
            "model.dtype=float32",
            f"data.train={spec['train']}",
            f"data.eval={spec['eval']}",
            f"data.max_length={MAX_LENGTH}",
            f"optim.lr={spec['lr']}",
            "optim.schedule=cosine",
            f"run.max_steps={spec['steps']}",
            f"train.batch_size={spec['batch_size']}",
            f"train.micro_batch_size={spec['micro_batch_size']}",
            f"run.seed={spec['seed']}",
            f"run.out_dir={spec['out_dir']}",
            "run.resume=false",
            "run.progress=false",
        ]
    )
    if code:
        raise SystemExit(f"posttrain sft exited with {code}")
    return {"marks": marks}


def trl_worker(spec: dict) -> dict:
    """TRL's SFTTrainer on the same records, default or tuned; a callback timestamps steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in records
        ]
    )
    if spec["variant"] == "trl-tuned":
        tuning = dict(gradient_checkpointing=False, padding_free=True, max_length=None)
    else:
        tuning = dict(max_length=MAX_LENGTH)
    config = SFTConfig(
        output_dir=spec["out_dir"],
        use_cpu=True,
        bf16=False,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **tuning,
    )
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks: list[tuple[float, int]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # SFTTrainer's running count of real tokens (attention-mask sum / packed length)
            marks.append((time.perf_counter(), int(trainer._total_train_tokens)))

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    prepared = trainer.train_dataset
    dataset_tokens = sum(len(ids) for ids in prepared["input_ids"])
    dataset_targets = sum(sum(t != -100 for t in labels) for labels in prepared["labels"])
    trainer.train()
    totals = [0] + [total for _, total in marks]
    return {
        "marks": [(t, totals[i + 1] - totals[i]) for i, (t, _) in enumerate(marks)],
        "completion_only_loss": bool(trainer.completion_only_loss),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "padding_free": bool(trainer.padding_free),
        "optim": str(config.optim),
        "dataset_tokens": dataset_tokens,
        "dataset_targets": dataset_targets,
    }


def worker_main(name: str, spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    result = posttrain_worker(spec) if name == "posttrain" else trl_worker(spec)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# Orchestration -------------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> Path:
    """The TRL virtualenv's python, creating the venv on first use."""
    python = venv / "bin" / "python"
    version_check = f"import sys, trl; sys.exit(trl.__version__ != {TRL_PIN.split('==')[1]!r})"
    if python.exists() and subprocess.run([python, "-c", version_check]).returncode == 0:
        return python
    print(f"creating {venv} with {TORCH_PIN} and {TRL_PIN} (a few minutes, once)", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    for requirement in (TORCH_PIN, TRL_PIN):  # torch first, so trl cannot pull a CUDA build
        subprocess.run([python, "-m", "pip", "install", "--quiet", requirement], check=True)
    return python


def run_variant(python: Path, variant: str, spec: dict, work: Path, threads: int) -> dict:
    """Run one worker process; returns its result, or {"error": ...} with the log's tail."""
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
    """(tokens/s, s/step) over the steps after `warmup`, from end-of-step timestamps."""
    window = marks[warmup - 1 :]
    seconds = window[-1][0] - window[0][0]
    tokens = sum(tokens for _, tokens in window[1:])
    return tokens / seconds, seconds / (len(window) - 1)


def check_same_data(variant: str, result: dict, tokens: int, targets: int) -> None:
    """Stop if a TRL run tokenized the records differently from posttrain."""
    if "dataset_tokens" not in result:  # posttrain's own run
        return
    if (result["dataset_tokens"], result["dataset_targets"]) != (tokens, targets):
        raise SystemExit(
            f"{variant} tokenized the records differently: {result['dataset_tokens']} tokens, "
            f"{result['dataset_targets']} targets; posttrain: {tokens} tokens, {targets} targets"
        )


def useful_flops_per_token(size: str, examples: list) -> float:
    """The docstring's FLOP formula, averaged over the dataset's tokens."""
    from posttrain.models.tiny import build_model

    model = build_model("qwen2", size)
    c = model.config
    attn_width = c.num_attention_heads * (
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    )
    embed = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embed  # lm_head is tied
    flops = tokens = 0
    for e in examples:
        n, k = len(e.input_ids), e.num_targets
        flops += 6 * non_embedding * n + 6 * c.num_hidden_layers * attn_width * n * (n + 1)
        flops += 6 * c.hidden_size * c.vocab_size * k
        tokens += n
    return flops / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--records", type=int, default=512, help="training records to generate")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-sft")
    parser.add_argument("--trl-venv", type=Path, default=TRL_VENV)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 + 3 steps")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    args.variants = list(dict.fromkeys(args.variants))  # each once, in the order given
    if args.quick:
        args.sizes, args.warmup, args.steps, args.records = ["tiny"], 1, 3, 128
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the window starts at the end of a step")

    # Imported here: worker processes in the TRL venv read this file without posttrain.
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.roofline import measure_matmul_gflops
    from posttrain.data.records import CompletionRecord
    from posttrain.data.tokenize import tokenize_sft
    from posttrain.models.tiny import build_tokenizer, save_tiny

    trl_python = ensure_trl_venv(args.trl_venv) if args.variants != ["posttrain"] else None
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    records = make_records(args.records, seed=0)
    train = write_jsonl(work / "train.jsonl", records)
    evals = write_jsonl(work / "eval.jsonl", make_records(8, seed=1))
    examples = tokenize_sft(
        build_tokenizer(),
        [CompletionRecord(r["prompt"], r["completion"]) for r in records],
        source=str(train),
        chat=True,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_LENGTH,
    )
    dataset_tokens = sum(len(e.input_ids) for e in examples)
    dataset_targets = sum(e.num_targets for e in examples)

    torch.set_num_threads(args.threads)
    peak = measure_matmul_gflops(2048)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    print(f"fp32 matmul roofline (2048^2): {peak:.1f} GFLOP/s")
    print(
        f"{len(records)} records, {dataset_tokens / len(records):.0f} tokens per sequence on "
        f"average ({dataset_targets / dataset_tokens:.0%} answer tokens); {args.batch_size} "
        f"sequences per step in micro-batches of {args.micro_batch_size}; "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )

    results: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        model_dir = save_tiny(work / f"model-{size}", "qwen2", size)
        flops_per_token = useful_flops_per_token(size, examples)
        results[size] = {}
        for variant in args.variants:
            spec = dict(
                name=f"{size}-{variant}", model=str(model_dir), train=str(train), eval=str(evals),
                steps=args.warmup + args.steps, batch_size=args.batch_size,
                micro_batch_size=args.micro_batch_size, lr=args.lr, seed=0,
            )  # fmt: skip
            python = Path(sys.executable) if variant == "posttrain" else trl_python
            began = time.perf_counter()
            result = run_variant(python, variant, spec, work, args.threads)
            result["wall_s"] = time.perf_counter() - began
            if "error" not in result:
                check_same_data(variant, result, dataset_tokens, dataset_targets)
                tps, step_s = steady_rate(result["marks"], args.warmup)
                result.update(tokens_per_s=tps, step_s=step_s)
                result["roofline"] = tps * flops_per_token / (peak * 1e9)
            results[size][variant] = result
            status = result.get("error") or f"{result['tokens_per_s']:.0f} tok/s"
            print(f"  {size} {variant}: {status} ({result['wall_s']:.0f} s)", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print()
    header = (
        f"{'model':6} {'variant':12} {'tok/s':>8} {'s/step':>7} {'peak RSS':>9} "
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
            speedup = ours.get("tokens_per_s", float("nan")) / r["tokens_per_s"]
            print(
                f"{size:6} {variant:12} {r['tokens_per_s']:8.0f} {r['step_s']:7.2f} "
                f"{r['peak_rss_mb']:7.0f}MB {100 * r['roofline']:8.1f}% {speedup:16.2f}x"
            )
    same = all(
        [t for _, t in r["marks"]] == [t for _, t in by_variant["posttrain"]["marks"]]
        for by_variant in results.values()
        if "marks" in by_variant.get("posttrain", {})
        for r in by_variant.values()
        if "marks" in r
    )
    print(f"\nsame sequences in every step for all variants: {'yes' if same else 'no'}")
    print(f"load average at the end: {os.getloadavg()}; results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
