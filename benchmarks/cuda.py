"""The CUDA path on one GPU: `posttrain grpo` and `posttrain ppo` as a user runs them, with
fp32 master weights under bf16 autocast (`model.dtype=auto`) and with bf16 weights.

    python benchmarks/cuda.py --out /tmp/cuda                 # every run below, ~5 minutes
    python benchmarks/cuda.py --out /tmp/cuda --runs grpo-auto --steps 2

A random Qwen2 model of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864; posttrain's byte-level vocabulary of 320, so ~0.36B parameters), prompts
of the arithmetic task, completions of up to `--max-new-tokens` tokens (a random model rarely
stops, so nearly all are that long). Per run: seconds per step split into its phases
(sampling, rewards, reference, values, training), completion tokens per second, peak GPU memory
(`torch.cuda.max_memory_allocated`), the sampler-vs-training log-prob gap on the first
minibatch (`old_logprob_max_abs_diff`: what `old_logprobs=recompute` is for), and whether
every logged loss stayed finite. Writes `results.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2)  # fmt: skip

COMMON = [
    "data.task=arithmetic", "data.train_size=2000", "data.eval_size=64",
    "data.chat_template=never", "run.progress=false", "run.eval_every=0", "run.resume=false",
]  # fmt: skip

RUNS = {
    "grpo-auto": ["grpo", "grpo.group_size=8", "grpo.prompts_per_step=16",
                  "grpo.micro_batch_size=64", "grpo.beta=0.04", "optim.lr=1e-6"],
    "grpo-auto-recompute": ["grpo", "grpo.group_size=8", "grpo.prompts_per_step=16",
                            "grpo.micro_batch_size=64", "grpo.beta=0.04",
                            "grpo.old_logprobs=recompute"],
    "grpo-bf16": ["grpo", "model.dtype=bfloat16", "grpo.group_size=8", "grpo.prompts_per_step=16",
                  "grpo.micro_batch_size=64", "grpo.beta=0.04"],
    "ppo-auto": ["ppo", "critic.init=policy", "ppo.prompts_per_step=128", "ppo.epochs=2",
                 "ppo.minibatch_size=64", "ppo.micro_batch_size=64"],
    "ppo-bf16": ["ppo", "model.dtype=bfloat16", "critic.init=policy", "ppo.prompts_per_step=128",
                 "ppo.epochs=2", "ppo.minibatch_size=64", "ppo.micro_batch_size=64"],
}  # fmt: skip


def one(name: str, model: Path, out: Path, steps: int, max_new_tokens: int) -> dict:
    from posttrain.cli import main
    from posttrain.train.metrics import read_metrics

    recipe, *args = RUNS[name]
    run_dir = out / name
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    code = main([recipe, f"model.path={model}", *COMMON, *args, f"run.max_steps={steps}",
                 f"sampling.max_new_tokens={max_new_tokens}", f"run.out_dir={run_dir}"])  # fmt: skip
    seconds = time.perf_counter() - began
    if code:
        return {"error": f"exit code {code}"}
    metrics = [m for m in read_metrics(run_dir) if "time/train_s" in m]
    later = metrics[1:] or metrics  # the first step pays for CUDA warm-up
    mean = lambda key: sum(m[key] for m in later) / len(later)  # noqa: E731
    losses = [m.get("loss", m.get("policy_loss")) for m in metrics]
    return {
        "seconds_total": round(seconds, 1),
        # grpo: sample_s holds rewards too, reference_s the reference pass and advantages;
        # ppo: score_s, reference_s and values_s apart
        **{k[5:]: round(mean(k), 3) for k in later[0] if k.startswith("time/")},
        "completion_tokens_per_s": round(mean("completion_tokens_per_s"), 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "old_logprob_max_abs_diff": metrics[-1].get("old_logprob_max_abs_diff"),
        "finite": all(x is not None and math.isfinite(x) for x in losses),
        "eval_accuracy": [m.get("eval/accuracy") for m in read_metrics(run_dir) if "eval/accuracy" in m],
    }  # fmt: skip


def sampler_speed(model: Path, max_new_tokens: int) -> dict:
    """The built-in sampler alone: 128 prompts x 1 sample of `max_new_tokens`, fp32 and bf16
    weights, and whether the lean Llama-family forward ran (else transformers' own)."""
    from posttrain.models.llama_forward import unsupported_reason
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollout import HFSampler, SamplingParams

    out = {}
    prompts = [[10 + i % 50, 20, 30 + i % 7] for i in range(128)]
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=0)
    for dtype in ("float32", "bfloat16"):
        policy = load_causal_lm(str(model), torch.device("cuda"), dtype=dtype)
        sampler = HFSampler(policy, load_tokenizer(str(model)))
        sampler.generate(prompts[:8], params)  # warm-up
        torch.cuda.synchronize()
        began = time.perf_counter()
        batch = sampler.generate(prompts, params)
        torch.cuda.synchronize()
        out[dtype] = {
            "tokens_per_s": round(batch.generated_tokens / (time.perf_counter() - began), 1),
            "lean_forward": unsupported_reason(policy) or "yes",
        }
        del policy, sampler
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default=",".join(["sampler", *RUNS]))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    from posttrain.models.tiny import save_tiny

    assert torch.cuda.is_available(), "needs a CUDA device"
    model = save_tiny(args.out / "model", "qwen2", "tiny", **SHAPE)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "sampler" in args.runs.split(","):
        results["sampler"] = sampler_speed(model, args.max_new_tokens)
        print("sampler", json.dumps(results["sampler"]), flush=True)
    for name in [n for n in args.runs.split(",") if n != "sampler"]:
        try:
            results[name] = one(name, model, args.out, args.steps, args.max_new_tokens)
        except Exception as error:  # report every run, even after one fails
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(name, json.dumps(results[name]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
