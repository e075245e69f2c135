"""Train / held-out assignment by hashing a row's question text.

A question is held out when the SHA-256 of its text falls in the first `eval_fraction` of the
hash range. The assignment depends on the text alone, not on a seed or a size, so a held-out
question is never in any train split, whatever seeds and sizes the two were drawn with.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "eval")


def is_held_out(text: str, eval_fraction: float) -> bool:
    """Whether `text` belongs to the held-out split."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def check_split(split: str, eval_fraction: float, allowed: tuple[str, ...] = SPLITS) -> None:
    """Raise a ValueError naming the bad `split` or `eval_fraction`."""
    if split not in allowed:
        raise ValueError(f"split: expected one of {list(allowed)}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a number in (0, 1), got {eval_fraction}")


def split_seed(seed: int, split: str) -> int:
    """A different generator seed per split, so train and eval draw different streams."""
    return 2 * seed + (split != "train")
