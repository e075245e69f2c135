"""posttrain DPO vs TRL's DPOTrainer: preference pairs per second, peak memory and roofline fraction.

    python benchmarks/dpo.py                  # tiny and small models, both data shapes, 3 variants
    python benchmarks/dpo.py --quick          # smoke run: tiny model, 1 + 2 steps
    python benchmarks/dpo.py --sizes small --shapes long --warmup 2 --steps 12

Uses the TRL virtualenv of `benchmarks/sft.py` (`benchmarks/.venv-trl`, created on first use).

Same work on both sides:
- Two data shapes of plain-text pairs (no chat template; the byte tokenizer gives one token per
  character, and both sides append the eos token to each answer): `short`, prompts of ~10
  tokens and answers of ~40; `long`, prompts of ~200 tokens and answers of ~40. Each run
  checks that TRL's tokenized dataset has the same prompt and answer tokens as posttrain's.
- Random-weight qwen2 models from `posttrain.models.tiny.save_tiny` (tiny: hidden 256 x 4
  layers; small: hidden 512 x 8), fp32, sdpa attention, `use_cpu=True, bf16=False` for TRL.
- sigmoid DPO, beta 0.1, 16 pairs per optimizer step in micro-batches of 8 (TRL: per-device
  batch 8 x gradient accumulation 2), AdamW at lr 1e-6, cosine schedule, clipping at 1.0.
- The dataset holds exactly the pairs the run trains on ((warm-up + timed steps) x 16), so a
  precomputed reference pass covers one epoch.

Variants, each in its own process with OMP_NUM_THREADS set:
- posttrain: `posttrain dpo` as a user runs it: reference log-probs precomputed into a fresh
  (empty) cache, then pairs packed with each prompt computed once for both answers.
- TRL default: the DPOConfig defaults: gradient checkpointing on, a second model loaded as the
  reference and run on every step, chosen and rejected right-padded in one batch.
- TRL tuned: `gradient_checkpointing=False, precompute_ref_log_probs=True`
  (`padding_free` is "temporarily unavailable" in TRL 1.16's DPO and falls back to padding).

Measured: end-of-step timestamps (posttrain: a wrapper around `Learner.step`; TRL: a
callback). `train pairs/s` = pairs of steps W+1..W+K / wall time from the end of step W to the
end of step W+K. The reference pass before training is timed separately (posttrain: the
`reference.seconds` of summary.json, fingerprinting included; TRL: `_precompute_ref_logps`)
and amortized over the dataset's pairs: `pairs/s` = 1 / (1 / train pairs/s + reference
seconds / pairs). Peak memory: the process's peak RSS.

Roofline fraction = useful FLOP/s / the machine's fp32 matmul peak (`benchmarks.roofline`,
2048^2). Each model size also prints the ceiling of its own shape: the GFLOP/s of its linear
layers' forward and backward matmuls over one packed micro-batch's rows
(`measure_linear_gflops`), as a fraction of that peak, and a bound: the roofline fraction of a
run that did nothing but those matmuls (training forward and backward, reference forward), its
attention (`measure_attention_seconds`, forward and backward, over the same micro-batch's
layout) and its optimizer steps (`measure_optimizer_seconds`: clipping and fused AdamW), each at
the speed measured alone. Useful FLOPs per pair, from the model shape: 6 N T for the policy's forward and
backward plus 2 N T for the reference forward, N the parameters without the input embedding
(the tied output head counted once), T = prompt + chosen + rejected tokens (the prompt once:
computing it twice is work, but not useful work).
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the TRL worker runs this file outside posttrain's venv

from benchmarks.sft import TRL_VENV, _sentences, ensure_trl_venv, steady_rate  # noqa: E402

VARIANTS = ("posttrain", "trl-default", "trl-tuned")
SHAPES = {"short": (10, 40), "long": (200, 40)}  # (prompt, answer) characters = tokens
MAX_LENGTH = 1024
BETA = 0.1


def make_pairs(count: int, shape: str, seed: int) -> list[dict[str, str]]:
    """Prompt/chosen/rejected records of about the shape's lengths (+-20%)."""
    rng = random.Random(seed)
    prompt_len, answer_len = SHAPES[shape]
    around = lambda n: rng.randint(int(n * 0.8), int(n * 1.2))  # noqa: E731
    return [
        {
            "prompt": _sentences(rng, around(prompt_len)) + "\n",
            "chosen": _sentences(rng, around(answer_len)),
            "rejected": _sentences(rng, around(answer_len)),
        }
        for _ in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Workers -------------------------------------------------------------------------------------


def posttrain_worker(spec: dict) -> dict:
    from posttrain.cli import main as posttrain_main
    from posttrain.train.learner import Learner

    marks: list[tuple[float, int]] = []
    step = Learner.step

    def timed_step(self, micro_batches, weights, loss_fn):
        metrics = step(self, micro_batches, weights, loss_fn)
        marks.append((time.perf_counter(), int(sum(weights))))
        return metrics

    Learner.step = timed_step
    cache = Path(spec["out_dir"]) / "reference-cache"
    shutil.rmtree(cache, ignore_errors=True)  # a miss: the reference pass is timed
    code = posttrain_main(
        [
            "dpo", "loss=dpo", f"beta={BETA}", f"model.path={spec['model']}",
            "model.dtype=float32", f"data.train={spec['train']}", f"data.eval={spec['eval']}",
            "data.chat_template=never", f"data.max_length={MAX_LENGTH}",
            f"data.max_prompt_length={MAX_LENGTH}", f"optim.lr={spec['lr']}",
            "optim.schedule=cosine", f"run.max_steps={spec['steps']}",
            f"train.batch_size={spec['batch_size']}",
            f"train.micro_batch_size={spec['micro_batch_size']}", f"run.seed={spec['seed']}",
            f"run.out_dir={spec['out_dir']}", "run.resume=false", "run.progress=false",
            f"reference.cache_dir={cache}",
        ]
    )  # fmt: skip
    if code:
        raise SystemExit(f"posttrain dpo exited with {code}")
    summary = json.loads((Path(spec["out_dir"]) / "summary.json").read_text())
    return {"marks": marks, "reference_s": summary["reference"]["seconds"]}


def trl_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    tuning = {}
    if spec["variant"] == "trl-tuned":
        tuning = dict(gradient_checkpointing=False, precompute_ref_log_probs=True)
    config = DPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", seed=spec["seed"], beta=BETA,
        max_length=MAX_LENGTH, report_to="none", save_strategy="no", disable_tqdm=True,
        **tuning,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks: list[tuple[float, int]] = []
    reference_s = [0.0]
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        began = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        reference_s[0] += time.perf_counter() - began
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), spec["batch_size"]))

    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    data = trainer.train_dataset
    trainer.train()
    return {
        "marks": marks,
        "reference_s": reference_s[0],
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "precompute_ref_log_probs": bool(config.precompute_ref_log_probs),
        "separate_ref_model": trainer.ref_model is not None,
        "dataset_tokens": [
            sum(len(x) for x in data[column])
            for column in ("prompt_ids", "chosen_ids", "rejected_ids")
        ],
    }


def worker_main(name: str, spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    result = posttrain_worker(spec) if name == "posttrain" else trl_worker(spec)
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# Orchestration -------------------------------------------------------------------------------


def run_variant(python: Path, variant: str, spec: dict, work: Path, threads: int) -> dict:
    """Run one worker process; returns its result, or {"error": ...} with the log's tail."""
    name = spec["name"]
    spec = {**spec, "variant": variant, "out_dir": str(work / name),
            "result": str(work / f"{name}.json")}  # fmt: skip
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


def flop_params(size: str) -> int:
    """Parameters without the input embedding (the tied output head counted once)."""
    from posttrain.models.tiny import build_model

    model = build_model("qwen2", size)
    non_embedding = (
        sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    )
    return non_embedding + model.get_output_embeddings().weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-dpo")
    parser.add_argument("--trl-venv", type=Path, default=TRL_VENV)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 + 2 steps")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    if args.quick:
        args.sizes, args.warmup, args.steps = ["tiny"], 1, 2
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the window starts at the end of a step")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.roofline import (
        linear_shapes,
        measure_attention_seconds,
        measure_linear_gflops,
        measure_matmul_gflops,
        measure_optimizer_seconds,
    )
    from posttrain.data.pairs import collate_pairs, tokenize_pairs
    from posttrain.data.records import PreferenceRecord
    from posttrain.models.tiny import build_tokenizer, save_tiny

    trl_python = ensure_trl_venv(args.trl_venv) if set(args.variants) - {"posttrain"} else None
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    peak = measure_matmul_gflops(2048)
    pairs_per_run = (args.warmup + args.steps) * args.batch_size
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    print(f"fp32 matmul roofline (2048^2): {peak:.1f} GFLOP/s")
    print(f"{pairs_per_run} pairs per run, {args.batch_size} per step in micro-batches of "
          f"{args.micro_batch_size}; {args.warmup} warm-up + {args.steps} timed steps", flush=True)  # fmt: skip

    results: dict[str, dict] = {}
    for shape in args.shapes:
        records = make_pairs(pairs_per_run, shape, seed=0)
        train = write_jsonl(work / f"{shape}-train.jsonl", records)
        evals = write_jsonl(work / f"{shape}-eval.jsonl", make_pairs(8, shape, seed=1))
        examples = tokenize_pairs(
            build_tokenizer(), [PreferenceRecord(**r) for r in records], source=str(train),
            chat=False, kto=False, seed=0, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH,
            truncate=False,
        )  # fmt: skip
        tokens = [sum(len(e.prompt) for e in examples)] + [
            sum(len(e.answers[i]) for e in examples) for i in (0, 1)
        ]
        per_pair = sum(tokens) / len(examples)
        print(f"\n{shape}: {tokens[0] / len(examples):.0f} prompt + "
              f"{(tokens[1] + tokens[2]) / 2 / len(examples):.0f} answer tokens per pair on average")  # fmt: skip
        for size in args.sizes:
            model_dir = save_tiny(work / f"model-{size}", "qwen2", size)
            flops_per_pair = 8 * flop_params(size) * per_pair  # 6NT train + 2NT reference
            key = f"{shape}/{size}"
            results[key] = {}
            # The ceiling for this shape: the model's own linear layers (forward and backward)
            # over one packed micro-batch's rows, each prompt once. Narrow matmuls sit far below
            # the square 2048^2 peak on this CPU, whoever runs them. With attention and the
            # optimizer (not in the FLOP count, but work all the same), the bound a run that did
            # nothing else reaches.
            config = AutoConfig.from_pretrained(model_dir)
            layout = collate_pairs(examples[: args.micro_batch_size], None, packed=True, pad_id=0).batch.layout  # fmt: skip
            rows, n = layout.num_tokens, flop_params(size)
            shapes = linear_shapes(config)
            ceiling = measure_linear_gflops(shapes, rows)
            optimizer_s = measure_optimizer_seconds(AutoModelForCausalLM.from_pretrained(model_dir))
            seconds = (
                6 * n * rows / (ceiling * 1e9)
                + 2 * n * rows / (measure_linear_gflops(shapes, rows, backward=False) * 1e9)
                + config.num_hidden_layers
                * sum(measure_attention_seconds(config, layout, backward=b) for b in (True, False))
                + optimizer_s * args.micro_batch_size / args.batch_size  # one step per batch
            )
            bound = 8 * n * rows / seconds / (peak * 1e9)
            print(f"  {key}: the model's linear layers over {rows} rows: {ceiling:.1f} GFLOP/s, "
                  f"{100 * ceiling / peak:.0f}% of the 2048^2 peak; with attention and AdamW: a bound of "
                  f"{100 * bound:.0f}% of the roofline", flush=True)  # fmt: skip
            for variant in args.variants:
                spec = dict(
                    name=f"{shape}-{size}-{variant}", model=str(model_dir), train=str(train),
                    eval=str(evals), steps=args.warmup + args.steps, batch_size=args.batch_size,
                    micro_batch_size=args.micro_batch_size, lr=args.lr, seed=0,
                )  # fmt: skip
                python = Path(sys.executable) if variant == "posttrain" else trl_python
                began = time.perf_counter()
                r = run_variant(python, variant, spec, work, args.threads)
                r["wall_s"] = time.perf_counter() - began
                if "error" not in r:
                    if r.get("dataset_tokens", tokens) != tokens:
                        raise SystemExit(f"{variant} tokenized differently: {r['dataset_tokens']} "
                                         f"(prompt, chosen, rejected) tokens vs {tokens}")  # fmt: skip
                    train_rate, step_s = steady_rate(r["marks"], args.warmup)
                    rate = 1 / (1 / train_rate + r["reference_s"] / pairs_per_run)
                    r.update(train_pairs_per_s=train_rate, pairs_per_s=rate, step_s=step_s)
                    r["roofline"] = rate * flops_per_pair / (peak * 1e9)
                results[key][variant] = r
                status = r.get("error") or f"{r['pairs_per_s']:.1f} pairs/s"
                print(f"  {key} {variant}: {status} ({r['wall_s']:.0f} s)", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))

    header = (f"{'shape/model':12} {'variant':12} {'train pairs/s':>13} {'ref s':>6} "
              f"{'pairs/s':>8} {'peak RSS':>9} {'%roofline':>9} {'posttrain speedup':>17}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for key, by_variant in results.items():
        ours = by_variant.get("posttrain", {})
        for variant, r in by_variant.items():
            if "error" in r:
                print(f"{key:12} {variant:12} {r['error']}")
                continue
            speedup = ours.get("pairs_per_s", float("nan")) / r["pairs_per_s"]
            print(f"{key:12} {variant:12} {r['train_pairs_per_s']:13.1f} {r['reference_s']:6.1f} "
                  f"{r['pairs_per_s']:8.1f} {r['peak_rss_mb']:7.0f}MB {100 * r['roofline']:8.1f}% "
                  f"{speedup:16.2f}x")  # fmt: skip
    print(f"\nload average at the end: {os.getloadavg()}; results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
