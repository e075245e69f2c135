"""Built-in sampler vs Hugging Face `generate` (and vLLM, where installed): tokens per second
on the same work.

    python -m benchmarks.generate                 # the full table (a few minutes on 2 cores)
    python -m benchmarks.generate --sizes tiny --repeats 2
    .venv-vllm/bin/python -m benchmarks.generate  # with vLLM's engine (`make test-vllm` builds it)

vLLM runs in this process through posttrain's engine (`sampling.engine: vllm`), started from the
same weights; its start-up (engine construction) is reported apart, and its first call, which
compiles kernels, is the warm-up like every engine's.

Both engines get the same random-weight model, the same ragged prompts (lengths drawn uniformly
from 16..64 byte tokens) and must generate exactly the requested tokens: ours with
`ignore_eos=True`, HF with `min_new_tokens` equal to `max_new_tokens`. Both sample at
temperature 1 with no truncation (HF's default top_k=50 is switched off). HF gets its
`num_return_sequences` for n > 1. HF does not return logprobs here, ours does: that is in HF's
favour. Each cell runs the engines alternately `--repeats` times after a warm-up and reports the
fastest run of each (the least disturbed by other processes on a shared machine).

Roofline fraction: useful FLOPs / best time / measured fp32 matmul peak, where useful FLOPs
count each distinct prompt's real tokens once (no padding, no per-sample repeat) plus every
decode step:
    FLOPs = sum over forward tokens of (2 * N + 4 * L * H * c)  +  2 * d * V * logit rows
with N the non-embedding parameters, L layers, H = heads x head_dim, c the tokens attended to
(itself included), d the hidden size, V the vocabulary, and one logit row per prompt and per
decode step (both engines keep only the last position's logits).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `posttrain` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.roofline import measure_matmul_gflops
from posttrain.models.tiny import PAD_ID, build_model
from posttrain.rollout import HFSampler, SamplingParams

CASES = {  # name: (prompts, n, new tokens)
    "a": (64, 1, 32),
    "b": (8, 8, 128),
}


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (count,), generator=generator).tolist()
    return [torch.randint(0, 256, (length,), generator=generator).tolist() for length in lengths]


def useful_flops(
    model: torch.nn.Module, prompts: list[list[int]], n: int, new_tokens: int
) -> float:
    config = model.config
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    embed = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embed  # lm_head is tied
    flops = 0.0
    for prompt in prompts:
        length = len(prompt)
        contexts = length * (length + 1) / 2  # causal prefill: token i attends to i + 1 tokens
        flops += 2 * non_embedding * length + 4 * layers * attn_width * contexts
        flops += 2 * hidden * vocab  # first token's logits
        # n rows each feed new_tokens - 1 tokens back; the one at step t attends length + t + 1.
        decode_contexts = sum(length + t + 1 for t in range(new_tokens - 1))
        flops += n * (
            (new_tokens - 1) * (2 * non_embedding + 2 * hidden * vocab)
            + 4 * layers * attn_width * decode_contexts
        )
    return flops


def run_hf(model: torch.nn.Module, prompts: list[list[int]], n: int, new_tokens: int) -> int:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_ID)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):  # left padding, as HF expects for decoder-only models
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=n,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    return (out.shape[1] - width) * out.shape[0]


def run_ours(sampler, prompts: list[list[int]], n: int, new_tokens: int) -> int:
    params = SamplingParams(n=n, max_new_tokens=new_tokens, ignore_eos=True)
    return sampler.generate(prompts, params).generated_tokens


def bench_cell(size: str, case: str, repeats: int, vllm: bool) -> dict[str, float]:
    count, n, new_tokens = CASES[case]
    model = build_model("qwen2", size).eval()
    prompts = make_prompts(count)
    samplers = {"ours": HFSampler(model, seed=0)}
    startup = {}
    if vllm:
        from posttrain.rollout.vllm_engine import VLLMSampler

        samplers["vllm"] = VLLMSampler(model, seed=0, max_model_len=256)
        startup["vllm_start_s"] = samplers["vllm"].start_seconds
    torch.manual_seed(0)
    expected = count * n * new_tokens
    best = {"hf": float("inf")} | {name: float("inf") for name in samplers}
    for rep in range(repeats + 1):
        for engine in best:
            start = time.perf_counter()
            if engine == "hf":
                made = run_hf(model, prompts, n, new_tokens)
            else:
                made = run_ours(samplers[engine], prompts, n, new_tokens)
            seconds = time.perf_counter() - start
            assert made == expected, f"{engine} generated {made} tokens, expected {expected}"
            if rep > 0:  # rep 0 is the warm-up
                best[engine] = min(best[engine], seconds)
    if "vllm" in samplers:
        samplers["vllm"].close()
    return {
        "tokens": expected,
        **{f"{name}_s": seconds for name, seconds in best.items()},
        **startup,
        "flops": useful_flops(model, prompts, n, new_tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine per cell")
    args = parser.parse_args()
    vllm = importlib.util.find_spec("vllm") is not None

    peak = measure_matmul_gflops(2048)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul roofline (2048^2): {peak:.1f} GFLOP/s")
    print()
    header = (
        f"{'model':6} {'case':22} {'HF tok/s':>9} {'ours tok/s':>10} {'ratio':>6} "
        f"{'HF %roof':>8} {'ours %roof':>10}"
    ) + (f" {'vLLM tok/s':>10} {'vLLM start':>10}" if vllm else "")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for case in args.cases:
            count, n, new_tokens = CASES[case]
            cell = bench_cell(size, case, args.repeats, vllm)
            hf_tps = cell["tokens"] / cell["hf_s"]
            ours_tps = cell["tokens"] / cell["ours_s"]
            hf_roof = cell["flops"] / cell["hf_s"] / 1e9 / peak
            ours_roof = cell["flops"] / cell["ours_s"] / 1e9 / peak
            label = f"({case}) {count}x n={n} x {new_tokens} tok"
            line = (
                f"{size:6} {label:22} {hf_tps:9.0f} {ours_tps:10.0f} "
                f"{ours_tps / hf_tps:5.2f}x {100 * hf_roof:7.1f}% {100 * ours_roof:9.1f}%"
            )
            if vllm:
                line += f" {cell['tokens'] / cell['vllm_s']:10.0f} {cell['vllm_start_s']:9.1f}s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
