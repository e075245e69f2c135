"""Rewards that compare text: exact match of the extracted answer against the field `answer`,
partial credit per digit, a regex match, and the `<think>...</think><answer>...</answer>` format reward of DeepSeek-R1
(DeepSeek-AI 2025, arXiv:2501.12948, §2.2.2 "format rewards")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.extraction import Extract, extract_answer

THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
"""The whole completion is one think block followed by one answer block."""


class ExactMatchReward:
    """1.0 when the extracted answer equals the field `answer` after stripping surrounding
    whitespace (and case, with `ignore_case`), else 0.0. `extract="full"` (the default)
    compares the whole completion, as the arithmetic task needs; "boxed" and "answer_tag"
    take the last `\\boxed{}` or `<answer>` block."""

    def __init__(
        self,
        *,
        extract: Extract = "full",
        answer_pattern: str | None = None,
        ignore_case: bool = False,
        name: str = "exact_match",
    ) -> None:
        self.name, self.extract, self.answer_pattern = name, extract, answer_pattern
        self.ignore_case = ignore_case

    def _normal(self, text: str) -> str:
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        if "answer" not in fields:
            raise ValueError(f"reward {self.name!r}: needs the field 'answer'")
        scores = []
        for completion, gold in zip(completions, fields["answer"], strict=True):
            answer = extract_answer(completion, self.extract, self.answer_pattern)
            scores.append(
                float(answer is not None and self._normal(answer) == self._normal(str(gold)))
            )
        return RewardOutput(scores)


class DigitMatchReward:
    """Partial credit for numeric answers: the fraction of character positions, aligned from
    the right (units under units), where the completion agrees with the field `answer`, over
    the longer of the two. `53` for `53` scores 1, `56` scores 0.5, `-55` for `-45` scores 2/3.
    Denser than exact match, so fewer groups have rewards that all agree; use it beside
    `exact_match`."""

    def __init__(self, *, name: str = "digit_match") -> None:
        self.name = name

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        if "answer" not in fields:
            raise ValueError(f"reward {self.name!r}: needs the field 'answer'")
        scores = []
        for completion, gold in zip(completions, fields["answer"], strict=True):
            got, want = completion.strip(), str(gold).strip()
            width = max(len(got), len(want), 1)
            same = sum(a == b for a, b in zip(got[::-1], want[::-1], strict=False))
            scores.append(same / width)
        return RewardOutput(scores)


class RegexReward:
    """1.0 when `pattern` matches the completion, else 0.0: `mode="search"` anywhere,
    `"fullmatch"` the whole text. Flags: DOTALL always (so `.` crosses lines), plus
    IGNORECASE with `ignore_case`."""

    def __init__(
        self,
        *,
        pattern: str,
        mode: Literal["search", "fullmatch"] = "search",
        ignore_case: bool = False,
        name: str = "regex",
    ) -> None:
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"mode: expected 'search' or 'fullmatch', got {mode!r}")
        self.name, self.mode = name, mode
        self.regex = re.compile(pattern, re.DOTALL | (re.IGNORECASE if ignore_case else 0))

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        match = self.regex.fullmatch if self.mode == "fullmatch" else self.regex.search
        return RewardOutput([float(match(c) is not None) for c in completions])


def format_reward(*, pattern: str = THINK_ANSWER, name: str = "format") -> RegexReward:
    """1.0 when the whole completion is `<think>...</think><answer>...</answer>` (or `pattern`)."""
    return RegexReward(pattern=pattern, mode="fullmatch", name=name)
