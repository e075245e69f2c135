"""Length control: a reward for hitting a target length, DAPO's soft overlong penalty, and an
n-gram repetition penalty.

Length is counted in `unit`: "chars" (the default: needs nothing), "words" (whitespace-split)
or "tokens". Tokens come from the field `completion_lengths` when the recipe passes the
sampler's counts, else from `tokenizer` (a tokenizer object with `encode`, or a local Hugging
Face tokenizer directory); asking for tokens with neither is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from posttrain.rewards.base import RewardOutput

Unit = Literal["chars", "words", "tokens"]


class LengthCounter:
    """Counts completion lengths in `unit` (see the module docstring)."""

    def __init__(self, unit: Unit = "chars", tokenizer: Any = None) -> None:
        if unit not in ("chars", "words", "tokens"):
            raise ValueError(f"unit: expected 'chars', 'words' or 'tokens', got {unit!r}")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.unit, self.tokenizer = unit, tokenizer

    def __call__(self, completions: Sequence[str], fields: dict[str, Sequence[Any]]) -> list[int]:
        if self.unit == "chars":
            return [len(c) for c in completions]
        if self.unit == "words":
            return [len(c.split()) for c in completions]
        if "completion_lengths" in fields:
            return [int(n) for n in fields["completion_lengths"]]
        if self.tokenizer is None:
            raise ValueError(
                "unit='tokens' needs the field 'completion_lengths' (token counts from the "
                "sampler) or the option 'tokenizer'"
            )
        return [len(self.tokenizer.encode(c, add_special_tokens=False)) for c in completions]


class TargetLengthReward:
    """`1 - min(1, |n - target| / scale)`: 1 at the target length, falling linearly to 0 at
    `scale` away (default `scale = target`).

    The linear penalty on the distance to a target follows L1's LCPO-Exact reward (Aggarwal &
    Welleck 2025, arXiv:2503.04697: `correct - alpha * |n_gold - n_y|`); here alpha = 1/scale,
    clipped so the reward stays in [0, 1], and correctness is a separate composite component. The
    target is the option `target`, or per row the field `target_length` (L1 states it in the
    prompt), which wins when present."""

    def __init__(
        self,
        *,
        target: int | None = None,
        scale: float | None = None,
        unit: Unit = "chars",
        tokenizer: Any = None,
        name: str = "length",
    ) -> None:
        if target is not None and target <= 0:
            raise ValueError(f"target: expected a positive length, got {target}")
        self.name, self.target, self.scale = name, target, scale
        self.count = LengthCounter(unit, tokenizer)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        lengths = self.count(completions, fields)
        if "target_length" in fields:
            targets = [int(t) for t in fields["target_length"]]
        elif self.target is not None:
            targets = [self.target] * len(completions)
        else:
            raise ValueError(
                f"reward {self.name!r}: set the option 'target' or the field 'target_length'"
            )
        scores = [
            1.0 - min(1.0, abs(n - t) / (self.scale or t))
            for n, t in zip(lengths, targets, strict=True)
        ]
        return RewardOutput(scores, components={"length": [float(n) for n in lengths]})


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), for a length
    `n`, `L_max = max_length` and `L_cache = cache_length`:

        0                                  if n <= L_max - L_cache
        ((L_max - L_cache) - n) / L_cache  if L_max - L_cache < n <= L_max
        -1                                 if n > L_max

    DAPO counts tokens (`unit="tokens"`), with L_max = 20480 and L_cache = 4096."""

    def __init__(
        self,
        *,
        max_length: int,
        cache_length: int,
        unit: Unit = "tokens",
        tokenizer: Any = None,
        name: str = "overlong",
    ) -> None:
        if not 0 < cache_length <= max_length:
            raise ValueError(
                f"cache_length: expected 0 < cache_length <= max_length ({max_length}), got {cache_length}"
            )
        self.name, self.max_length, self.cache_length = name, max_length, cache_length
        self.count = LengthCounter(unit, tokenizer)

    def penalty(self, n: int) -> float:
        """Eq. 13 for one length."""
        soft_start = self.max_length - self.cache_length
        if n <= soft_start:
            return 0.0
        if n <= self.max_length:
            return (soft_start - n) / self.cache_length
        return -1.0

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        lengths = self.count(completions, fields)
        return RewardOutput(
            [self.penalty(n) for n in lengths], components={"length": [float(n) for n in lengths]}
        )


class RepetitionPenalty:
    """`-(1 - distinct / total)` over the completion's word n-grams (lower-cased, split on
    whitespace): 0 for text without a repeated n-gram, towards -1 for text that loops. Text
    shorter than `n` words scores 0. The n-gram repetition penalty of Yeo et al. 2025
    ("Demystifying Long Chain-of-Thought Reasoning in LLMs", arXiv:2502.03373), in the form of
    Open-R1's `repetition_penalty_reward` (scale it with the composite weight)."""

    def __init__(self, *, n: int = 3, name: str = "repetition") -> None:
        if n < 1:
            raise ValueError(f"n: expected at least 1, got {n}")
        self.name, self.n = name, n

    def repeated_fraction(self, text: str) -> float:
        """`1 - distinct / total` word n-grams of `text`."""
        words = text.lower().split()
        ngrams = [tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1)]
        return 1.0 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        return RewardOutput([-self.repeated_fraction(c) for c in completions])
