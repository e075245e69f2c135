"""The one reward interface that every online recipe, best-of-N and preference labelling call.

A reward function is any callable

    fn(prompts: Sequence[str], completions: Sequence[str], **fields: Sequence) -> RewardOutput

with one entry per completion in every argument: `prompts[i]` is the prompt that `completions[i]`
answers (repeated for the n samples of a prompt) and each keyword in `fields` is a column the
task carries (a reference `answer`, an IFEval `instruction_id_list`, code `tests`...), aligned the
same way. Learned reward models, verifiers, LLM judges and human labels all fit this signature.

Functions that wait on something (a judge endpoint, a process pool) may also define
`async def acall(...)` with the same arguments; `score_async` uses it when present and otherwise
runs the plain call in a worker thread.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class RewardError(ValueError):
    """A reward function broke its contract (wrong length, NaN, wrong type)."""


class RewardSetupError(RuntimeError):
    """A reward that cannot work as configured (a judge's wrong key, model or URL): no
    fallback applies, the run stops with this message."""


@dataclass
class RewardOutput:
    scores: list[float]
    """One finite score per completion, in input order."""
    components: dict[str, list[float]] = field(default_factory=dict)
    """Named parts for logging (e.g. "format", "correct"), each one value per completion."""
    step_scores: list[list[tuple[int, float]]] | None = None
    """Optional dense rewards, per completion a list of `(end_char, score)`: the step ending at
    character offset `end_char` of the completion text earned `score` (a process reward model's
    verdict on a reasoning step, or a per-token reward with one entry per token). Character
    offsets keep reward functions tokenizer-free; recipes map them to token positions."""
    skipped: list[bool] | None = None
    """Completions whose reward failed under the "skip" fallback: recipes leave them out of the
    update. None means none were skipped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-batch numbers for the run log, not per completion (e.g. `reward/math/failures`)."""

    def __len__(self) -> int:
        return len(self.scores)


@runtime_checkable
class RewardFunction(Protocol):
    name: str

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput: ...


def check_output(output: Any, count: int, name: str) -> RewardOutput:
    """Validate a reward function's return value at the boundary; raise `RewardError` naming
    the function and the first bad entry."""
    if not isinstance(output, RewardOutput):
        raise RewardError(f"reward {name!r} returned {type(output).__name__}, not RewardOutput")
    columns = {
        "scores": output.scores,
        **{f"components[{k!r}]": v for k, v in output.components.items()},
    }
    for label, values in columns.items():
        if len(values) != count:
            raise RewardError(
                f"reward {name!r}: {label} has {len(values)} values for {count} completions"
            )
    for i, score in enumerate(output.scores):
        skipped = output.skipped is not None and output.skipped[i]
        if not skipped and not (isinstance(score, int | float) and math.isfinite(score)):
            raise RewardError(
                f"reward {name!r}: completion {i} scored {score!r}, not a finite number"
            )
    if output.step_scores is not None and len(output.step_scores) != count:
        raise RewardError(
            f"reward {name!r}: step_scores has {len(output.step_scores)} entries for {count} completions"
        )
    if output.skipped is not None and len(output.skipped) != count:
        raise RewardError(
            f"reward {name!r}: skipped has {len(output.skipped)} entries for {count} completions"
        )
    return output


async def score_async(
    fn: RewardFunction, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
) -> RewardOutput:
    """Await `fn.acall` when the function has one, else run `fn` in a worker thread."""
    if hasattr(fn, "acall"):
        return await fn.acall(prompts, completions, **fields)
    return await asyncio.to_thread(fn, prompts, completions, **fields)
