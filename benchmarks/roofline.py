"""The machine's measured matmul throughput: the roofline other benchmarks report against.

    python -m benchmarks.roofline            # prints GFLOP/s at 512, 1024 and 2048

`measure_matmul_gflops` is the best of several timed `torch.mm` calls (2 n^3 FLOPs each), so on
a shared machine it approaches what the hardware can do rather than what the neighbours leave.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_gflops(
    n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 10
) -> float:
    """Peak GFLOP/s of an (n, n) @ (n, n) matmul on the CPU with torch's current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, caches, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in (512, 1024, 2048):
        print(f"fp32 matmul {n}x{n}: {measure_matmul_gflops(n):7.1f} GFLOP/s")
    print(f"bf16 matmul 2048x2048: {measure_matmul_gflops(2048, torch.bfloat16, 3):7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
