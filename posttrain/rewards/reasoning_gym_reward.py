"""Scores answers to reasoning-gym tasks with each task's own `score_answer(answer, entry)`
(reasoning-gym, Stojanovski et al. 2025, arXiv:2505.24760). Scores lie in [0, 1]; several
tasks give partial credit (e.g. a near-miss number).

A row names its entry in the field `reasoning_gym`: `{"dataset": name, "config": {...},
"index": i}`, where `config` holds the `create_dataset` keywords (`seed`, `size`, task
options). The entry is rebuilt with `create_dataset(dataset, **config)[index]` (procedural and
seeded, so it is the same entry), keeping rows JSON-friendly: some tasks' metadata hold
values that do not survive a JSON round trip. A row may instead carry the whole entry in the
field `entry` (a dict with `metadata.source_dataset`), scored with that task's default config.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.extraction import Extract, extract_answer

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(name, **json.loads(config_json))


def rebuild_entry(source: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """`(entry, dataset)` for a `{"dataset", "config", "index"}` reference."""
    dataset = _dataset(source["dataset"], json.dumps(source.get("config", {}), sort_keys=True))
    return dataset[int(source["index"])], dataset


class ReasoningGymReward:
    """The task's `score_answer` of the extracted answer (the last `<answer>...</answer>` by
    default; no answer scores 0). A scorer that raises on a malformed answer scores 0, is
    logged and is counted in `reward/<name>/scorer_errors`. Components: `has_answer`."""

    def __init__(
        self,
        *,
        extract: Extract = "answer_tag",
        answer_pattern: str | None = None,
        name: str = "reasoning_gym",
    ) -> None:
        self.name, self.extract, self.answer_pattern = name, extract, answer_pattern

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        if "reasoning_gym" not in fields and "entry" not in fields:
            raise ValueError(
                f"reward {self.name!r}: needs the field 'reasoning_gym' "
                "({'dataset', 'config', 'index'}) or 'entry' (a reasoning-gym entry)"
            )
        scores, has_answer, errors = [], [], 0
        for i, completion in enumerate(completions):
            score_answer, entry = self._scorer(fields, i)
            answer = extract_answer(completion, self.extract, self.answer_pattern)
            has_answer.append(float(answer is not None))
            try:
                score = float(score_answer(answer, entry)) if answer is not None else 0.0
            except Exception as error:  # the task's scorer choked on a model's malformed answer
                errors += 1
                log.warning(
                    "reward %r: completion %d: %s.score_answer raised %s: %s; scored 0",
                    self.name,
                    i,
                    entry["metadata"]["source_dataset"],
                    type(error).__name__,
                    error,
                )
                score = 0.0
            scores.append(score)
        return RewardOutput(
            scores,
            components={"has_answer": has_answer},
            metrics={f"reward/{self.name}/scorer_errors": float(errors)},
        )

    def _scorer(self, fields: dict[str, Sequence[Any]], i: int) -> tuple[Any, dict[str, Any]]:
        source = fields["reasoning_gym"][i] if "reasoning_gym" in fields else None
        if source:
            entry, dataset = rebuild_entry(source)
            return dataset.score_answer, entry
        import reasoning_gym

        entry = fields["entry"][i]
        return reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"]), entry
