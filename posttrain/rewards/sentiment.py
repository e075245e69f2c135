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
    Components: `positive`, `negative`, `neutral` (VADER's proportions)."""

    def __init__(self, *, target: str = "positive", name: str = "sentiment") -> None:
        if target not in ("positive", "negative"):
            raise ValueError(f"target: expected 'positive' or 'negative', got {target!r}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name, self.sign = name, 1.0 if target == "positive" else -1.0
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        polarity = [self.analyzer.polarity_scores(c) for c in completions]
        return RewardOutput(
            [self.sign * p["compound"] for p in polarity],
            components={
                "positive": [p["pos"] for p in polarity],
                "negative": [p["neg"] for p in polarity],
                "neutral": [p["neu"] for p in polarity],
            },
        )
