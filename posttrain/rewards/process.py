"""A process reward model (PRM) as a reward function: a score per reasoning step.

`ProcessRewardScorer` loads a PRM that `posttrain prm` saved (a decoder sequence classifier with
one head, its step separator in `config.prm_step_separator`), splits each completion into steps
(`posttrain.data.steps`), and reads P(correct final answer | prompt, steps 1..k) =
sigmoid(score) at each step's last token, in one padding-free forward per batch.

It returns the per-step probabilities as `step_scores` (`(end_char, p_k)`, what `posttrain
grpo`'s `grpo.process` turns into per-token advantages) and one score per completion, the steps
aggregated:

- `min`: the solution is as good as its worst step (Lightman et al. 2023, Sec. 2.6, and
  Math-Shepherd's verification, Wang et al. 2024, Sec. 3.3);
- `prod`: the product of the steps' probabilities (Lightman et al. 2023);
- `last`: the last step's probability, the PRM read as an outcome model;
- `none`: 0 for every completion, so that only the step scores count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import AutoModelForSequenceClassification

from posttrain.data.steps import collate_steps, encode_steps, split_steps
from posttrain.data.tokenize import uses_chat_template
from posttrain.models.loading import load_tokenizer
from posttrain.models.packed_attention import enable_packed_attention
from posttrain.models.reward import RewardModel
from posttrain.rewards.base import RewardOutput

Aggregate = Literal["min", "prod", "last", "none"]


def aggregate_steps(probabilities: Sequence[float], how: Aggregate) -> float:
    """One solution's score from its steps' probabilities (see the module docstring); a
    solution with no step scores 0."""
    if how == "none" or not probabilities:
        return 0.0
    if how == "min":
        return min(probabilities)
    if how == "prod":
        return math.prod(probabilities)
    if how == "last":
        return probabilities[-1]
    raise ValueError(f"unknown step aggregate {how!r}; expected min, prod, last or none")


class ProcessRewardScorer:
    """`fn(prompts, completions, **fields) -> RewardOutput` from a trained PRM.

    Args:
        path: a `posttrain prm` model directory (`runs/prm/final`).
        aggregate: how the completion's score comes from its steps (module docstring).
        separator: the step separator; default the one the PRM was trained with.
        batch_size: completions per forward pass.
        device: 'cpu', 'cuda[:i]', or 'auto' (cuda when available).
        chat_template: 'auto' | 'always' | 'never', as in training.
        name: the reward's name in logs.
    """

    def __init__(
        self,
        path: str,
        *,
        aggregate: Aggregate = "min",
        separator: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        chat_template: str = "auto",
        name: str = "prm",
    ):
        aggregate_steps([], aggregate)  # fails now on an unknown aggregate
        self.name, self.aggregate, self.batch_size = name, aggregate, batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(path, "prm")
        classifier = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="sdpa", local_files_only=True
        )
        self.separator = separator or getattr(classifier.config, "prm_step_separator", None)
        if not self.separator:
            raise ValueError(
                f"prm: {path!r} names no step separator (config.prm_step_separator); pass "
                "options.separator, or train the PRM with `posttrain prm`"
            )
        enable_packed_attention()
        self.model = RewardModel(classifier.to(self.device).eval())
        self.chat = uses_chat_template(self.tokenizer, chat_template)

    @torch.no_grad()
    def step_probabilities(
        self, prompts: Sequence[str], steps: Sequence[list[str]]
    ) -> list[list[float]]:
        """P(correct | prefix through step k) for every step of every solution."""
        out: list[list[float]] = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [
                encode_steps(self.tokenizer, p, s, self.chat)
                for p, s in zip(
                    prompts[start : start + self.batch_size],
                    steps[start : start + self.batch_size],
                    strict=True,
                )
            ]
            scored = [e for e in encoded if e[1]]
            probabilities = iter([])
            if scored:
                sb = collate_steps(scored).to(self.device)
                logits = self.model.scores_at(sb.batch, sb.positions)[:, 0].float()
                probabilities = iter(torch.sigmoid(logits).cpu().tolist())
            out += [[next(probabilities) for _ in ends] for _, ends in encoded]
        return out

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        steps = [split_steps(c, self.separator) for c in completions]
        probabilities = self.step_probabilities(list(prompts), steps)
        step_scores = []
        for pieces, ps in zip(steps, probabilities, strict=True):
            ends = [sum(len(x) for x in pieces[: k + 1]) for k in range(len(pieces))]
            step_scores.append(list(zip(ends, ps, strict=True)))
        scores = [aggregate_steps(ps, self.aggregate) for ps in probabilities]
        return RewardOutput(scores, step_scores=step_scores)
