"""Learning-rate schedules: linear warmup, then cosine, linear or constant to a floor."""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay
