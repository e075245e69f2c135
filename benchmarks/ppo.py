"""posttrain PPO vs TRL's PPOTrainer, beside a posttrain GRPO step of the same batch: completion
tokens per second of whole online RL steps.

    python benchmarks/ppo.py                # tiny and small models, shapes (a) and (b), 1 epoch
    python benchmarks/ppo.py --quick        # smoke run: tiny model, shape (a), 3 steps
    python benchmarks/ppo.py --sizes small --shapes b --epochs 1 4 --steps 8 --warmup 2

Needs `benchmarks/.venv-trl-ppo` with trl==1.12.0, the newest TRL release on the registry that
still ships a PPO trainer (`trl.experimental.ppo.PPOTrainer`; wheels inspected: 0.20.0 and 0.23.1
have `trl.PPOTrainer`, 0.26.2 to 1.12.0 `trl.experimental.ppo`, 1.13.0 to 1.16.0 none):

    python3 -m venv benchmarks/.venv-trl-ppo
    benchmarks/.venv-trl-ppo/bin/python -m pip install torch==2.13.0  # first: the CPU wheel
    benchmarks/.venv-trl-ppo/bin/python -m pip install trl==1.12.0    # brings transformers 5.24.0

Same work on every side, per step:
- 64 completions of at most 32 tokens, temperature 1, no top-k/top-p, stopping at the model's
  eos (<|im_end|>); a random model rarely emits it, so nearly every completion has 32 tokens.
  PPO: 64 prompts x 1 completion; GRPO: 8 prompts x G=8. Shape (a): prompts of 16-48 tokens;
  shape (b): ~256 (240-272). Plain-text prompts, no chat template, one token per character
  (`benchmarks.grpo.make_prompts`).
- Random-weight qwen2 models from `posttrain.models.tiny.save_tiny` ("tiny": 256 x 4 layers,
  "small": 512 x 8), fp32, sdpa attention; TRL with `use_cpu=True, bf16=False`.
- PPO's reward model and critic start from one directory: the policy's weights under a
  sequence-classification head with one output, seeded and saved once (`rm-<size>/`). posttrain:
  `reward_model=` it with `rewards` unset, `critic.init=reward_model`; TRL: `reward_model` and
  `value_model` both loaded from it, as TRL's example script does. A causal-LM directory would
  load too, but posttrain's reward would then get Hugging Face's default two heads.
- PPO: a reference forward every step (per-token k1 KL in the reward, kl_coef 0.05 on both
  sides), then E epochs (`--epochs`, default 1), each one minibatch of all 64 completions in
  micro-batches of 16. posttrain: `ppo.minibatch_size=0, micro_batch_size=16`, one policy and one
  critic optimizer step per epoch. TRL: per-device batch 16 x gradient accumulation 4,
  `num_mini_batches=1`, `num_ppo_epochs=E`: one optimizer step per epoch over policy and value
  model together (one AdamW). In TRL 1.12 `num_mini_batches` adds no optimizer steps (accelerate
  steps every `gradient_accumulation_steps` micro-batches), and an update that draws the
  dataloader's last batch steps at every micro-batch (accelerate syncs at a dataloader's end);
  so the prompt file holds one batch more than a run draws, and the worker counts the optimizer
  steps that ran (a row carries a warning when they are not steps x E). Policy AdamW at lr 1e-6
  (posttrain's critic at its default 1e-5).
- GRPO: benchmarks/grpo.py's posttrain step as it is (beta 0.04, so a reference forward; one
  optimizer step over all 64 completions; an exact-match reward that costs nothing). It has no
  reward model and no critic: the pair shows what PPO's two extra models cost on one batch.

Variants, each its own process with OMP_NUM_THREADS set: `posttrain ppo` as a user runs it
(sampler with the policy's live weights, pi_old from the sampler, packed forwards with the LM
head on completion tokens only; the reward model re-tokenizes prompt and completion text as
the policy reads them, without a chat template here); `posttrain grpo`
(benchmarks/grpo.py's worker); TRL's PPOTrainer with its PPOConfig defaults (gradient
checkpointing on, for the policy) and with gradient checkpointing off.

Measured: end-of-step timestamps, one per whole PPO step (sampling, scoring, reference, values,
GAE, every epoch of policy and critic updates, logging). posttrain ppo: a wrapper around
`Run.end_step`; posttrain grpo: around `Learner.step` (one per step there); TRL: `on_step_end`
(once per PPO update). Completion tokens per step: the `completion_length` x 64 that posttrain
logs; for TRL, the tokens each rollout sampled (through the first eos, else the whole width),
counted by wrapping its `batch_generation`. Throughput = tokens of steps W+1..W+K / wall time
from the end of step W to the end of step W+K. Peak memory: the process's peak RSS. Ratios
divide a row's tokens/s by TRL's (default, and without gradient checkpointing) in the same cell;
the GRPO row is compared with the TRL PPO cell of the fewest epochs.

Roofline fraction = useful FLOP/s / measured fp32 matmul peak (`benchmarks.roofline`). Useful
FLOPs of a PPO step, with N non-embedding parameters, L layers, A = heads x head_dim, d hidden,
V vocabulary, c the mean completion length, over 64 prompts of p tokens (the file's first 64
stand for each step's):
    backbone(p) = 2N (p + c) + 2 L A (p + c) (p + c + 1)
    policy forward = backbone(p) + 2 d V c          classifier forward = backbone(p)
    useful = sum_p (2 + 3E) x (policy forward + classifier forward)
i.e. per step the policy samples (1) and the reference scores (1), the reward model (1) and the
critic (1) read every sequence, and each epoch trains the policy (3: forward + backward) and the
critic (3). The classifier's one-output head is left out. Attention counts 4 L A FLOPs per
query-key pair of the causal sequence. A GRPO row counts `benchmarks.grpo.useful_flops_per_step`.
Work a framework does beyond this (padding, the LM head on prompt tokens, gradient
checkpointing, a chat template around the reward model's input) is not useful.
The bound column is the roofline fraction of a step that did nothing but its linear-layer
matmuls (policy, reference, reward model and critic), at the speed each shape reaches alone
(decode runs 64-row matmuls), its packed attention and its optimizer steps (`bound_per_step`; for GRPO `benchmarks.grpo.bound_per_step`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "benchmarks" / ".venv-trl-ppo"
VARIANTS = ("ppo", "grpo", "trl-default", "trl-no-gc")
COMPLETIONS, COMPLETION, MICRO = 64, 32, 16  # per step; tokens; completions per forward
KL_COEF, LR = 0.05, 1e-6


# Workers ---------------------------------------------------------------------------------


def ppo_worker(spec: dict) -> dict:
    from posttrain.cli import main as posttrain_main
    from posttrain.train.run import Run

    marks: list[tuple[float, float]] = []
    # seconds per step: sampling, reward model, reference, critic values, training
    phases: list[dict[str, float]] = []
    end_step = Run.end_step

    def timed_end_step(self, step, metrics, *args, **kwargs):
        out = end_step(self, step, metrics, *args, **kwargs)
        marks.append((time.perf_counter(), metrics["completion_length"] * COMPLETIONS))
        phases.append({k[5:-2]: round(v, 3) for k, v in metrics.items() if k.startswith("time/")})
        return out

    Run.end_step = timed_end_step
    code = posttrain_main(
        [
            "ppo", f"model.path={spec['model']}", "model.dtype=float32",
            f"reward_model={spec['reward_model']}", "critic.init=reward_model",
            f"data.train={spec['prompts']}", "data.train_size=0", "data.eval_size=0",
            "data.chat_template=never", f"ppo.prompts_per_step={COMPLETIONS}",
            "ppo.samples_per_prompt=1", f"ppo.epochs={spec['epochs']}", "ppo.minibatch_size=0",
            f"ppo.micro_batch_size={MICRO}", f"ppo.kl_coef={KL_COEF}",
            f"sampling.max_new_tokens={COMPLETION}", "sampling.temperature=1.0",
            "sampling.log_samples=0", f"optim.lr={LR}", f"run.max_steps={spec['steps']}",
            f"run.out_dir={spec['out_dir']}", "run.resume=false", "run.progress=false",
            "run.eval_every=0", "run.log_every=1",
        ]
    )  # fmt: skip
    if code:
        raise SystemExit(f"posttrain ppo exited with {code}")
    return {"marks": marks, "phase_s": phases}


def trl_worker(spec: dict) -> dict:
    """TRL's PPOTrainer; see the module docstring for the settings."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    rows = [json.loads(x) for x in Path(spec["prompts"]).read_text().splitlines()]
    # PPOTrainer wants a pre-tokenized dataset with an input_ids column only.
    dataset = Dataset.from_dict({"input_ids": [tokenizer(r["prompt"])["input_ids"] for r in rows]})
    tuning = {"gradient_checkpointing": False} if spec["variant"] == "trl-no-gc" else {}
    config = PPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, seed=0, report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=LR,
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=COMPLETIONS // MICRO,
        num_mini_batches=1, num_ppo_epochs=spec["epochs"],
        total_episodes=spec["steps"] * COMPLETIONS,  # one update = COMPLETIONS episodes
        local_rollout_forward_batch_size=COMPLETIONS, response_length=COMPLETION,
        temperature=1.0, stop_token="eos", kl_coef=KL_COEF,
        num_sample_generations=0,  # no debugging generations (they would need an eval set)
        **tuning,
    )  # fmt: skip
    fp32 = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], **fp32)
    reference = AutoModelForCausalLM.from_pretrained(spec["model"], **fp32)  # a separate object
    reward_model, value_model = (
        AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **fp32)
        for _ in range(2)
    )  # fmt: skip

    # Tokens each rollout samples: `generate` keeps decoding until every row stops, so a row
    # without an eos ran for the whole generated width.
    generated: list[int] = []
    batch_generation = ppo_module.batch_generation

    def counting_batch_generation(model, queries, *args, **kwargs):
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1] :]
        is_eos = responses == tokenizer.eos_token_id
        width = torch.full_like(responses[:, 0], responses.shape[1])
        generated.append(int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, width).sum()))
        return query_responses, logits

    ppo_module.batch_generation = counting_batch_generation
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=reference,
        reward_model=reward_model, value_model=value_model, train_dataset=dataset,
        callbacks=[StepTimer()],
    )  # fmt: skip
    # Optimizer steps that really run (accelerate skips them between accumulation boundaries).
    optimizer_steps = [0]
    inner = trainer.optimizer.optimizer
    inner_step = inner.step

    def counted_step(*args, **kwargs):
        optimizer_steps[0] += 1
        return inner_step(*args, **kwargs)

    inner.step = counted_step
    trainer.train()
    return {
        "marks": list(zip(marks, generated, strict=True)),
        "optimizer_steps": optimizer_steps[0],
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    }


def worker_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if name == "grpo":
        from benchmarks.grpo import posttrain_worker

        result = posttrain_worker(spec)
    else:
        result = ppo_worker(spec) if name == "ppo" else trl_worker(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# Orchestration ---------------------------------------------------------------------------


def save_classifier(policy_dir: Path, out: Path) -> Path:
    """The reward model and the critic's start: the policy's weights under a one-output
    sequence-classification head, seeded, saved with the policy's tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new `score` head is reported missing from the checkpoint
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id  # pooled at the last non-pad token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def useful_flops_per_step(
    model_dir: Path, prompts: list[dict], completion_tokens: float, epochs: int
) -> float:
    """Sampling, reference, reward model, critic values, and per epoch policy and critic
    forward + backward (x3 each); see the module docstring."""
    from transformers import AutoConfig

    from benchmarks.roofline import linear_shapes

    config = AutoConfig.from_pretrained(model_dir)
    L, d, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    N = L * sum(i * o for i, o in linear_shapes(config))
    A = config.num_attention_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)  # fmt: skip
    c = completion_tokens / COMPLETIONS  # mean completion length
    backbone = sum(
        2 * N * (p + c) + 2 * L * A * (p + c) * (p + c + 1)
        for p in (len(r["prompt"]) for r in prompts[:COMPLETIONS])
    )
    head = COMPLETIONS * 2 * d * V * c  # the LM head at every completion token
    return (2 + 3 * epochs) * (backbone + head + backbone)


def bound_per_step(
    model_dir: Path, rm_dir: Path, prompts: list[dict], completion_tokens: float, epochs: int
) -> float:
    """Seconds of one PPO step's unavoidable work at the speeds measured alone: the linear
    layers' matmuls (sampling: each prompt once, then one token per completion per decode step;
    reference, reward-model and critic-value forwards; `epochs` policy and critic forward +
    backward passes, over packed micro-batches of MICRO completions), their packed attention,
    and a policy and a critic optimizer step per epoch. The LM and value heads, decode attention,
    sampling and GAE are left out, so the bound is generous."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

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
    c = round(completion_tokens / COMPLETIONS)
    lengths = [len(r["prompt"]) for r in prompts[:COMPLETIONS]]
    groups, start = [], 0
    for p in lengths[:MICRO]:  # one micro-batch: MICRO prompts, one completion each
        groups.append(Group(start, p, (c,)))
        start += p + c
    layout = PackedLayout(tuple(groups))
    rows, micro_batches = layout.num_tokens, COMPLETIONS // MICRO

    def matmuls(tokens: float, rows: int, backward: bool) -> float:
        return (3 if backward else 1) * two_n * tokens / (measure_linear_gflops(shapes, rows, backward=backward) * 1e9)  # fmt: skip

    packed_tokens = sum(lengths) + COMPLETIONS * c
    attention = {b: measure_attention_seconds(config, layout, backward=b) for b in (True, False)}
    optimizer = measure_optimizer_seconds(AutoModelForCausalLM.from_pretrained(model_dir))
    optimizer += measure_optimizer_seconds(AutoModelForSequenceClassification.from_pretrained(rm_dir))  # fmt: skip
    return (
        matmuls(sum(lengths), sum(lengths), False)  # prefill
        + matmuls(COMPLETIONS * c, COMPLETIONS, False)  # decode
        + 3 * matmuls(packed_tokens, rows, False)  # reference, reward model, critic values
        + 2 * epochs * matmuls(packed_tokens, rows, True)  # policy and critic training
        + micro_batches * config.num_hidden_layers
        * (3 * attention[False] + 2 * epochs * attention[True])
        + epochs * optimizer
    )  # fmt: skip


def run_variant(python: Path, variant: str, spec: dict, work: Path, threads: int) -> dict:
    name = spec["name"]
    spec = {**spec, "variant": variant, "out_dir": str(work / name), "result": str(work / f"{name}.json")}  # fmt: skip
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # fmt: skip
    log_path = work / f"{name}.log"
    worker = variant if variant in ("ppo", "grpo") else "trl"
    with log_path.open("w") as log:
        command = [python, __file__, "--worker", worker, "--spec", spec_path]
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {code}: {tail[0][:200]} (log: {log_path})"}
    return json.loads(Path(spec["result"]).read_text())


def print_table(results: list[dict]) -> None:
    def trl_rate(r: dict, variant: str) -> float | None:
        epochs = r["epochs"] or min((x["epochs"] for x in results if x["epochs"]), default=None)
        for x in results:
            if (x["size"], x["shape"], x["epochs"], x["variant"]) == (r["size"], r["shape"], epochs, variant):  # fmt: skip
                return x.get("tokens_per_s")
        return None

    print(f"\n{'model':6} {'shape':5} {'ep':>2} {'variant':12} {'tok/s':>8} {'s/step':>7} {'vs TRL':>7} {'vs no-gc':>8} {'peak RSS':>9} {'%roofline':>9} {'bound':>6}")  # fmt: skip
    for r in results:
        head = f"{r['size']:6} {r['shape']:5} {r['epochs'] or '-':>2} {r['variant']:12}"
        if "error" in r:
            print(f"{head} {r['error']}")
        elif "tokens_per_s" in r:
            ratios = [trl_rate(r, v) for v in ("trl-default", "trl-no-gc")]
            ratios = [f"{r['tokens_per_s'] / x:.2f}x" if x else "-" for x in ratios]
            bound = f"{100 * r['bound']:5.0f}%" if "bound" in r else "-"
            print(f"{head} {r['tokens_per_s']:8.0f} {r['s_per_step']:7.2f} {ratios[0]:>7} {ratios[1]:>8} {r['peak_rss_mb']:7.0f}MB {100 * r['roofline']:8.1f}% {bound:>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["ppo", "grpo", "trl"])
    parser.add_argument("--spec")
    parser.add_argument(
        "--quick", action="store_true", help="tiny, shape (a), 3 steps, 1 epoch: a smoke run"
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--shapes", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", nargs="+", type=int, default=[1], help="PPO epochs per step (one cell each)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-ppo"))
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.spec)
        return
    if args.quick:
        args.sizes, args.shapes, args.epochs, args.steps, args.warmup = ["tiny"], ["a"], [1], 3, 1
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    trl_python = TRL_VENV / "bin" / "python"
    if not trl_python.exists() and any(v.startswith("trl") for v in args.variants):
        raise SystemExit(f"{trl_python} missing: create it as the module docstring says")

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks import grpo
    from benchmarks.roofline import measure_matmul_gflops
    from posttrain.models.tiny import save_tiny

    torch.set_num_threads(args.threads)
    peak = measure_matmul_gflops()
    print(f"fp32 matmul roofline (2048^2, {args.threads} threads): {peak:.1f} GFLOP/s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results, bounds = [], {}
    for size in args.sizes:
        model = save_tiny(work / f"model-{size}", "qwen2", size, seed=0)
        rm = save_classifier(model, work / f"rm-{size}")
        for shape in args.shapes:
            # One batch more than TRL draws: see the module docstring.
            rows = grpo.make_prompts(COMPLETIONS * (args.steps + 1), grpo.SHAPES[shape], seed=0)
            prompts = work / f"prompts-{shape}.jsonl"
            prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
            cells = [("grpo", None)] if "grpo" in args.variants else []
            cells += [(v, e) for e in args.epochs for v in args.variants if v != "grpo"]
            for variant, epochs in cells:
                python = trl_python if variant.startswith("trl") else Path(sys.executable)
                name = f"{size}-{shape}-{variant}" + (f"-e{epochs}" if epochs else "")
                spec = {"name": name, "model": str(model), "reward_model": str(rm), "prompts": str(prompts), "steps": args.steps, "epochs": epochs}  # fmt: skip
                result = run_variant(python, variant, spec, work, args.threads)
                result.update(size=size, shape=shape, variant=variant, epochs=epochs)
                if "optimizer_steps" in result and result["optimizer_steps"] != args.steps * epochs:
                    result["warning"] = f"{result['optimizer_steps']} optimizer steps, expected {args.steps * epochs}"  # fmt: skip
                if "marks" in result and len(result["marks"]) > args.warmup:
                    tps, sps = grpo.steady_rate(result["marks"], args.warmup)
                    per_step = sum(t for _, t in result["marks"]) / len(result["marks"])
                    if variant == "grpo":
                        flops = grpo.useful_flops_per_step(size, rows, per_step)
                        seconds = grpo.bound_per_step(model, rows, per_step)
                    else:
                        flops = useful_flops_per_step(model, rows, per_step, epochs)
                        key = (size, shape, epochs, round(per_step / COMPLETIONS))
                        if key not in bounds:
                            bounds[key] = bound_per_step(model, rm, rows, per_step, epochs)
                        seconds = bounds[key]
                    result.update(
                        tokens_per_s=tps, s_per_step=sps, roofline=flops / sps / (peak * 1e9),
                        bound=flops / seconds / (peak * 1e9),
                    )  # fmt: skip
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "marks"}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
