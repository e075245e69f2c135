"""The machine's measured matmul throughput: the roofline other benchmarks report against.

    python -m benchmarks.roofline            # prints GFLOP/s at 512, 1024 and 2048

`measure_matmul_gflops` is the best of several timed `torch.mm` calls (2 n^3 FLOPs each), so on
a shared machine it approaches what the hardware can do rather than what the neighbours leave.

`measure_linear_gflops` times the matmuls a model's linear layers run in training (forward,
input gradient, weight gradient) at the model's own shapes and row count: small models' narrow
matmuls cannot reach the square 2048^2 peak, and this says how far below it their ceiling is.

`measure_attention_seconds` times one layer's attention over a packed layout, and
`measure_optimizer_seconds` one clipped AdamW step: work every framework must do, which a FLOP
count from the model shape leaves out. With them a benchmark prints a bound: the roofline
fraction a run would reach if it did nothing but its linear-layer matmuls, its attention and
its optimizer steps, each at the speed measured here.
"""

from __future__ import annotations

import time

import torch


def best_seconds(once, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `once`, after one untimed warm-up call (thread
    pool, caches, page faults, lazily created state)."""
    once()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_gflops(
    n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 10
) -> float:
    """Peak GFLOP/s of an (n, n) @ (n, n) matmul on the CPU with torch's current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9


def linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear layers for a Llama-family config."""
    d, f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def measure_linear_gflops(
    shapes: list[tuple[int, int]], rows: int, *, backward: bool = True, repeats: int = 5
) -> float:
    """Best GFLOP/s of `y = x W^T` over `rows` rows for each `(in, out)` in `shapes`, with the
    backward's `dx = dy W` and `dW = dy^T x` when `backward`: 2 rows in out FLOPs each."""
    generator = torch.Generator().manual_seed(0)
    tensors = [
        (torch.randn(rows, i, generator=generator), torch.randn(o, i, generator=generator),
         torch.randn(rows, o, generator=generator))
        for i, o in shapes
    ]  # fmt: skip

    def once() -> None:
        for x, w, dy in tensors:
            torch.nn.functional.linear(x, w)
            if backward:
                torch.mm(dy, w)
                torch.mm(dy.t(), x)

    flops = sum(2 * rows * i * o for i, o in shapes) * (3 if backward else 1)
    return flops / best_seconds(once, repeats) / 1e9


def measure_attention_seconds(config, layout, *, backward: bool = True, repeats: int = 5) -> float:
    """Best seconds of one attention layer of a Llama-family `config` over a packed `layout`
    (`posttrain.data.layout.PackedLayout`), through posttrain's packed SDPA; with
    the backward when `backward`."""
    from posttrain.models.packed_attention import packed_sdpa_forward

    d = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    generator = torch.Generator().manual_seed(0)
    n = layout.num_tokens
    q, k, v = (
        torch.randn(1, h, n, head_dim, generator=generator).requires_grad_(backward)
        for h in (heads, kv_heads, kv_heads)
    )

    def once() -> None:
        with torch.set_grad_enabled(backward):
            out, _ = packed_sdpa_forward(torch.nn.Module(), q, k, v, None, packed_layout=layout)
            if backward:
                out.backward(torch.ones_like(out))

    return best_seconds(once, repeats)


def measure_optimizer_seconds(model: torch.nn.Module, repeats: int = 5) -> float:
    """Best seconds of one optimizer step as every trainer takes it: gradient-norm clipping and
    a fused AdamW update over all of `model`'s parameters (random gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def once() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return best_seconds(once, repeats)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in (512, 1024, 2048):
        print(f"fp32 matmul {n}x{n}: {measure_matmul_gflops(n):7.1f} GFLOP/s")
    print(f"bf16 matmul 2048x2048: {measure_matmul_gflops(2048, torch.bfloat16, 3):7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
