"""posttrain GRPO vs TRL's GRPOTrainer: completion tokens per second of whole online RL steps.

    python benchmarks/grpo.py               # tiny and small models, shapes (a) and (b)
    python benchmarks/grpo.py --quick       # smoke run: tiny model, shape (a), 2 steps
    python benchmarks/grpo.py --sizes small --shapes b --steps 8 --warmup 2

Needs `benchmarks/.venv-trl` (torch==2.13.0 CPU and trl==1.16.0; benchmarks/sft.py creates it).

Same work on both sides, per step:
- 8 prompts x G=8 completions of at most 32 tokens, temperature 1, no top-k/top-p; shape (a):
  prompts of 16-48 tokens; shape (b): prompts of ~256 tokens (240-272). Plain-text prompts
  (no chat template), one token per character (posttrain's byte tokenizer).
- Random-weight qwen2 models from `posttrain.models.tiny.save_tiny` ("tiny": 256 x 4 layers,
  "small": 512 x 8), fp32, sdpa attention; TRL with `use_cpu=True, bf16=False`.
- beta = 0.04 (a reference model forward every step on both sides), one optimizer step per
  generation batch (posttrain: minibatch = all 64 completions in micro-batches of 16; TRL:
  per-device batch 16 x gradient accumulation 4 = generation batch 64), AdamW at lr 1e-6.
- A reward that costs nothing: TRL completion length / 32; posttrain exact match against "0"
  (always 0, so advantages are 0, but every forward, backward and the KL term still run).
- Completions stop at the model's eos (<|im_end|>) on both sides; a random model rarely emits
  it, so nearly every completion has 32 tokens. Throughput counts the tokens actually sampled.

Variants, each its own process with OMP_NUM_THREADS set: `posttrain grpo` as a user runs it
(sampler with shared-prompt KV cache, pi_old from the sampler, shared-prompt packed training
forward, LM head on completion tokens only); the same under `torchrun` with 2 processes of
half the threads each (`posttrain-2proc`: each samples, scores and trains on half of the step,
gloo all-reduces the gradients; peak RSS is rank 0's); TRL with its GRPOConfig defaults
(gradient checkpointing on); TRL with gradient checkpointing off.

Measured: end-of-step timestamps (posttrain: a wrapper around `Learner.step`, one per RL step
here; TRL: `on_step_end`). Completion tokens per step: posttrain's metrics.jsonl
(`completion_length` x 64), TRL's logged `completions/mean_length` x 64. Throughput = tokens
of steps W+1..W+K / wall time from the end of step W to the end of step W+K (sampling, reward,
reference, training, logging all inside). Peak memory: the process's peak RSS.

Roofline fraction = useful FLOP/s / measured fp32 matmul peak (`benchmarks.roofline`). Useful
FLOPs per step, with N non-embedding parameters, L layers, A = heads x head_dim, d hidden,
V vocabulary, c the mean completion length, and each prompt of p tokens counted once:
    forward(prompt, G completions) = 2N (p + G c) + 2 L A p (p + 1)
                                     + G [4 L A (p c + c (c + 1) / 2) + 2 d V c]
    useful = 5 x forward: sampling (prefill + decode) 1, reference 1, training 3 (fwd + bwd).
Attention counts 4 L A FLOPs per query-key pair of the causal sequence. Work a framework does
beyond this (recomputing a prompt G times, padding, gradient checkpointing) is not useful.
Each posttrain cell also prints a bound (`bound_per_step`): the roofline fraction of a step that
did nothing but its linear-layer matmuls, at the speed each shape reaches alone (decode runs
64-row matmuls, which this CPU runs far below its square peak), its packed attention and its
optimizer step.
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
VARIANTS = ("posttrain", "posttrain-2proc", "trl-default", "trl-no-gc")
SHAPES = {"a": (16, 48), "b": (240, 272)}  # prompt length range in tokens
PROMPTS, G, COMPLETION, MICRO = 8, 8, 32, 16
BETA, LR = 0.04, 1e-6


def make_prompts(count: int, lengths: tuple[int, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz       0123456789+-="
    return [
        {
            "id": str(i),
            "prompt": "".join(rng.choice(alphabet) for _ in range(rng.randint(*lengths))),
            "answer": "0",
        }  # fmt: skip
        for i in range(count)
    ]


def length_reward(completions, **kwargs) -> list[float]:
    return [len(c) / COMPLETION for c in completions]


# Workers ---------------------------------------------------------------------------------


def posttrain_worker(spec: dict) -> dict:
    from posttrain.cli import main as posttrain_main
    from posttrain.train.learner import Learner

    marks: list[float] = []
    step = Learner.step

    def timed_step(self, micro_batches, weights, loss_fn):
        metrics = step(self, micro_batches, weights, loss_fn)
        marks.append(time.perf_counter())
        return metrics

    Learner.step = timed_step
    code = posttrain_main(
        [
            "grpo", f"model.path={spec['model']}", "model.dtype=float32",
            f"data.train={spec['prompts']}", "data.train_size=0", "data.eval_size=0",
            "data.chat_template=never", "rewards=[{name: exact_match}]",
            f"grpo.group_size={G}", f"grpo.prompts_per_step={PROMPTS}",
            f"sampling.max_new_tokens={COMPLETION}", f"grpo.micro_batch_size={MICRO}",
            f"grpo.beta={BETA}", f"optim.lr={LR}", f"run.max_steps={spec['steps']}",
            f"run.out_dir={spec['out_dir']}", "run.resume=false", "run.progress=false",
            "sampling.log_samples=0", "run.eval_every=0",
        ]
    )  # fmt: skip
    if code:
        raise SystemExit(f"posttrain grpo exited with {code}")
    metrics = [json.loads(x) for x in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    tokens = [m["completion_length"] * PROMPTS * G for m in metrics if "completion_length" in m]
    return {"marks": list(zip(marks, tokens, strict=True))}


def trl_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in Path(spec["prompts"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    tuning = {"gradient_checkpointing": False} if spec["variant"] == "trl-no-gc" else {}
    config = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, max_steps=spec["steps"],
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * G // MICRO,
        num_generations=G, max_completion_length=COMPLETION, temperature=1.0, beta=BETA,
        learning_rate=LR, seed=0, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, **tuning,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    trainer = GRPOTrainer(
        model=model, reward_funcs=length_reward, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    tokens = [n * PROMPTS * G for n in lengths]
    return {
        "marks": list(zip(marks, tokens, strict=False)),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "loss_type": config.loss_type,
    }


def worker_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = posttrain_worker(spec) if name == "posttrain" else trl_worker(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        Path(spec["result"]).write_text(json.dumps(result))


# Orchestration ---------------------------------------------------------------------------


def useful_flops_per_step(size: str, prompts: list[dict], completion_tokens: float) -> float:
    """Sampling + reference forward + training forward/backward, see the module docstring."""
    from posttrain.models.tiny import SIZES

    s = SIZES[size]
    d, L, inter, V = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], 320
    kv = s["num_key_value_heads"] * d // s["num_attention_heads"]
    N = L * (2 * d * d + 2 * d * kv + 3 * d * inter)  # q, o, k, v projections and the MLP
    A = d
    c = completion_tokens / (PROMPTS * G)  # mean completion length
    forward = 0.0
    for row in prompts[:PROMPTS]:
        p = len(row["prompt"])
        forward += 2 * N * p + 2 * L * A * p * (p + 1)  # the prompt, once
        # G completions: 2N per token, attention to p + i keys, head at every completion token
        forward += G * (2 * N * c + 4 * L * A * (p * c + c * (c + 1) / 2) + 2 * d * V * c)
    return forward * (1 + 1 + 3)  # sampling, reference, training (x3)


def bound_per_step(model_dir: Path, prompts: list[dict], completion_tokens: float) -> float:
    """Seconds of one step's unavoidable work at the speeds measured alone: the linear layers'
    matmuls (sampling: each prompt once, then one token per completion per decode step;
    reference forward; training forward and backward, over packed micro-batches of MICRO
    completions), the packed attention of reference and training, and one optimizer step.
    Decode attention, sampling and everything else are left out, so the bound is generous."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.roofline import (
        linear_shapes,
        measure_attention_seconds,
        measure_linear_gflops,
        measure_optimizer_seconds,
    )
    from posttrain.data.layout import Group, PackedLayout

    config = AutoConfig.from_pretrained(model_dir)
    shapes = linear_shapes(config)
    two_n = 2 * config.num_hidden_layers * sum(i * o for i, o in shapes)  # FLOPs per token
    c = round(completion_tokens / (PROMPTS * G))
    lengths = [len(r["prompt"]) for r in prompts[:PROMPTS]]
    per_micro = MICRO // G  # prompts per training micro-batch
    groups, start = [], 0
    for p in lengths[:per_micro]:
        groups.append(Group(start, p, (c,) * G))
        start += p + G * c
    layout = PackedLayout(tuple(groups))
    rows, micro_batches = layout.num_tokens, PROMPTS // per_micro

    def matmuls(tokens: float, rows: int, backward: bool) -> float:
        return (3 if backward else 1) * two_n * tokens / (measure_linear_gflops(shapes, rows, backward=backward) * 1e9)  # fmt: skip

    packed_tokens = sum(lengths) + PROMPTS * G * c
    return (
        matmuls(sum(lengths), sum(lengths), False)  # prefill
        + matmuls(PROMPTS * G * c, PROMPTS * G, False)  # decode
        + matmuls(packed_tokens, rows, False)  # reference
        + matmuls(packed_tokens, rows, True)  # training
        + micro_batches * config.num_hidden_layers
        * sum(measure_attention_seconds(config, layout, backward=b) for b in (True, False))
        + measure_optimizer_seconds(AutoModelForCausalLM.from_pretrained(model_dir))  # one a step
    )  # fmt: skip


def steady_rate(marks: list, warmup: int) -> tuple[float, float]:
    window = marks[warmup - 1 :]
    seconds = window[-1][0] - window[0][0]
    return sum(t for _, t in window[1:]) / seconds, seconds / (len(window) - 1)


def run_variant(python: Path, variant: str, spec: dict, work: Path, threads: int) -> dict:
    name = spec["name"]
    spec = {**spec, "variant": variant, "out_dir": str(work / name), "result": str(work / f"{name}.json")}  # fmt: skip
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    processes = 2 if variant == "posttrain-2proc" else 1
    omp = str(max(1, threads // processes))
    env = {**os.environ, "OMP_NUM_THREADS": omp, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # fmt: skip
    log_path = work / f"{name}.log"
    worker = "posttrain" if variant.startswith("posttrain") else "trl"
    with log_path.open("w") as log:
        command = [python, __file__, "--worker", worker, "--spec", spec_path]
        if processes > 1:
            launcher = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
            ]
            command = [python, *launcher, *command[1:]]
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {code}: {tail[0][:200]} (log: {log_path})"}
    return json.loads(Path(spec["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["posttrain", "trl"])
    parser.add_argument("--spec")
    parser.add_argument(
        "--quick", action="store_true", help="tiny, shape (a), 2 steps: a smoke run"
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--shapes", nargs="+", default=["a", "b"], choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-grpo"))
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.spec)
        return
    if args.quick:
        args.sizes, args.shapes, args.steps, args.warmup = ["tiny"], ["a"], 2, 1
    trl_python = TRL_VENV / "bin" / "python"
    if any(v.startswith("trl") for v in args.variants) and not trl_python.exists():
        raise SystemExit(f"{trl_python} missing: run benchmarks/sft.py once to create it")

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.roofline import measure_matmul_gflops
    from posttrain.models.tiny import save_tiny

    torch.set_num_threads(args.threads)
    peak = measure_matmul_gflops()
    print(f"fp32 matmul roofline (2048^2, {args.threads} threads): {peak:.1f} GFLOP/s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        model = save_tiny(work / f"model-{size}", "qwen2", size, seed=0)
        for shape in args.shapes:
            rows = make_prompts(PROMPTS * args.steps * 2, SHAPES[shape], seed=0)
            prompts = work / f"prompts-{shape}.jsonl"
            prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
            for variant in args.variants:
                python = Path(sys.executable) if variant.startswith("posttrain") else trl_python
                spec = {"name": f"{size}-{shape}-{variant}", "model": str(model), "prompts": str(prompts), "steps": args.steps}  # fmt: skip
                result = run_variant(python, variant, spec, work, args.threads)
                result.update(size=size, shape=shape, variant=variant)
                if "marks" in result and len(result["marks"]) > args.warmup:
                    tps, sps = steady_rate(result["marks"], args.warmup)
                    per_step = sum(t for _, t in result["marks"]) / len(result["marks"])
                    flops = useful_flops_per_step(size, rows, per_step)
                    result.update(tokens_per_s=tps, s_per_step=sps, roofline=flops / sps / (peak * 1e9))  # fmt: skip
                    if variant.startswith("posttrain"):
                        bound = flops / bound_per_step(model, rows, per_step) / (peak * 1e9)
                        result["bound"] = bound
                        print(f"  {size} ({shape}): matmuls + packed attention alone would reach {100 * bound:.0f}% of the roofline")  # fmt: skip
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "marks"}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'model':6} {'shape':5} {'variant':12} {'tok/s':>8} {'s/step':>7} {'peak RSS':>9} {'%roofline':>9}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['size']:6} {r['shape']:5} {r['variant']:12} {r['error']}")
        elif "tokens_per_s" in r:
            print(f"{r['size']:6} {r['shape']:5} {r['variant']:12} {r['tokens_per_s']:8.0f} {r['s_per_step']:7.2f} {r['peak_rss_mb']:7.0f}MB {100 * r['roofline']:8.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
