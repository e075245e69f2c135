"""Sentiment of the completion: VADER's compound score (Hutto & Gilbert 2014, "VADER: A
Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM), via the
`vaderSentiment` package. A lexicon and rules, no model: the classic "make the text positive"
RLHF demo task, offline and fast."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.rewards.base import RewardOutput


class SentimentReward:
    """VADER compound score in [-1, 1] (1 most positive). `target="negative"` flips the sign.
    With `threshold`, a pass/fail verifier instead: 1 where the (signed) compound score is at
    least `threshold`, else 0. Components: `positive`, `negative`, `neutral` (VADER's
    proportions)."""

    def __init__(
        self, *, target: str = "positive", threshold: float | None = None, name: str = "sentiment"
    ) -> None:
        if target not in ("positive", "negative"):
            raise ValueError(f"target: expected 'positive' or 'negative', got {target!r}")
        if threshold is not None and not -1 <= threshold <= 1:
            raise ValueError(f"threshold: expected a compound score in [-1, 1], got {threshold}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name, self.sign = name, 1.0 if target == "positive" else -1.0
        self.threshold = threshold
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        polarity = [self.analyzer.polarity_scores(c) for c in completions]
        scores = [self.sign * p["compound"] for p in polarity]
        if self.threshold is not None:
            scores = [float(s >= self.threshold) for s in scores]
        return RewardOutput(
            scores,
            components={
                "positive": [p["pos"] for p in polarity],
                "negative": [p["neg"] for p in polarity],
                "neutral": [p["neu"] for p in polarity],
            },
        )
