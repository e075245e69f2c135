"""What `posttrain grpo` reads: prompt rows (a task or prompt files) and the scorer built from
the config's reward specs.

Prompt rows are dicts `{"id", "prompt", ...fields}`; the fields (a reference `answer`, a task's
metadata) are handed to every reward function, aligned with the completions.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from posttrain.data.loading import load_records
from posttrain.rewards import Component, CompositeReward, RewardOutput, RewardSpec, build_reward


def load_prompt_rows(data: Any, *, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train_rows, eval_rows)` from `data.task` or from the `data.train` / `data.eval` files."""
    if data.task:
        return _task_rows(data.task, data.train_size, data.eval_size, seed, data.task_options)
    if not data.train:
        raise ValueError("data: set data.task (a task name) or data.train (a prompt file)")

    def read(path: str, limit: int) -> list[dict]:
        records = load_records(path, "prompt", limit=limit or None)
        return [
            {"id": r.id or str(i), "prompt": r.prompt, **r.fields} for i, r in enumerate(records)
        ]

    held_out = read(data.eval, data.eval_size) if data.eval and data.eval_size else []
    return read(data.train, data.train_size), held_out


class Scorer:
    """Scores completions with the weighted sum of the configured rewards
    (`posttrain.rewards.CompositeReward`).

    Calling it with the prompt rows (one per completion), the completion texts and their token
    counts returns one dict per completion: `reward` (the weighted sum; NaN when skipped),
    `components` (each reward's own score), `correct` (the first reward scored it at least 1)
    and `skipped` (a reward failed under the 'skip' fallback).

    A spec's `name` is a registry name (`posttrain.rewards.REWARDS`) or an import path
    `package.module:function` to any callable with the reward signature."""

    def __init__(self, specs: Sequence[dict]) -> None:
        if not specs:
            raise ValueError("rewards: expected at least one reward spec {name, weight, ...}")
        components = []
        for i, raw in enumerate(specs):
            try:
                spec = RewardSpec.model_validate(raw)
            except ValidationError as error:
                raise ValueError(f"rewards[{i}]: {error.errors()[0]['msg']}") from None
            if ":" in spec.name:  # not in the registry: import it
                module, _, attr = spec.name.partition(":")
                fn, label = getattr(importlib.import_module(module), attr), spec.label or attr
            else:
                fn, label = build_reward(spec.name, **spec.options), spec.label or spec.name
            components.append(Component(label, fn, spec.weight, spec.fallback, spec.timeout_s))
        self.composite = CompositeReward(components)
        self.first = components[0].name

    def __call__(
        self, rows: Sequence[dict], completions: Sequence[str], lengths: Sequence[int]
    ) -> list[dict]:
        fields = {k: [row.get(k) for row in rows] for k in rows[0] if k not in ("prompt", "_ids")}
        fields["completion_lengths"] = list(lengths)  # token counts, for length rewards
        prompts = [row["prompt"] for row in rows]
        output = self.composite(prompts, completions, **fields)
        first = output.components[self.first]
        skipped = output.skipped or [False] * len(completions)
        return [
            {
                "reward": float(output.scores[i]),
                "components": {k: float(v[i]) for k, v in output.components.items()},
                "correct": float(first[i]) >= 1.0,  # NaN (skipped) compares False
                "skipped": bool(skipped[i]),
            }
            for i in range(len(completions))
        ]


def _task_rows(
    name: str, train_size: int, eval_size: int, seed: int, options: dict
) -> tuple[list[dict], list[dict]]:
    from posttrain.tasks import TASKS

    if name not in TASKS:
        raise ValueError(f"data.task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    make = getattr(TASKS[name], "make", TASKS[name])
    held_out = make("eval", eval_size, seed, **options) if eval_size else []
    return make("train", train_size, seed, **options), held_out


def digit_match(prompts, completions, *, answer, **fields) -> RewardOutput:
    """Partial credit for numeric answers: the fraction of character positions, aligned from
    the right (units under units), where the completion agrees with `answer`, over the longer
    of the two. `53` for `53` scores 1, `56` scores 0.5, `-55` for `-45` scores 2/3. Denser than
    exact match, so fewer groups have rewards that all agree; use it beside `exact_match`:
    `{name: "posttrain.recipes.grpo_inputs:digit_match", weight: 0.5}`."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        got, want = completion.strip(), str(gold).strip()
        width = max(len(got), len(want), 1)
        same = sum(a == b for a, b in zip(got[::-1], want[::-1], strict=False))
        scores.append(same / width)
    return RewardOutput(scores)
