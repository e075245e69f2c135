"""A weighted sum of named reward functions, scored concurrently, where a failing part is
named, logged once, replaced by its fallback and counted, never a crash and never a silent
wrong number.

    score[i] = sum_k weight_k * score_k[i]

A component fails when it raises, runs past its `timeout_s`, or returns something
`check_output` rejects (a NaN, the wrong length). Then its fallback applies to the whole
batch: a fixed score (e.g. 0.0), or "skip", which marks every completion `skipped` (score
NaN, so a recipe that ignores the flag fails loudly instead of learning from a made-up
number). A completion that a component itself marks skipped is skipped in the sum too. A
`RewardSetupError` (a reward that cannot work as configured: a judge's wrong key) is no
failure of a batch: it propagates and stops the run.

Components run at the same time, each in its own daemon thread (or as its `acall` coroutine in
`acall`). Python cannot stop a thread, so a component that times out is abandoned: its
thread finishes in the background and its result is discarded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.rewards.base import (
    RewardError,
    RewardFunction,
    RewardOutput,
    RewardSetupError,
    check_output,
)

log = logging.getLogger(__name__)

Fallback = Literal["skip"] | float


@dataclass(frozen=True)
class Component:
    """One reward in a composite: its name in logs and metrics, the function, its weight, what
    replaces its scores when it fails, and its time limit (None: no limit)."""

    name: str
    fn: RewardFunction
    weight: float = 1.0
    fallback: Fallback = "skip"
    timeout_s: float | None = None


def _start_in_thread(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
    """Run `fn` in a new daemon thread, so a stuck reward cannot hold up interpreter exit (the
    threads of `asyncio.to_thread` and `ThreadPoolExecutor` are joined at exit)."""
    future: cf.Future = cf.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the waiting caller, not swallowed
            future.set_exception(error)

    threading.Thread(target=target, name=f"reward-{name}", daemon=True).start()
    return future


class CompositeReward:
    """The weighted sum of `components`; see the module docstring.

    Output components: each component's own score under its name (NaN where skipped), its
    sub-components as `name/sub`. Metrics per call: `reward/<name>/failures` (1 if it failed
    in this call), `reward/<name>/mean` (over completions not skipped), `reward/<name>/seconds`,
    plus each component's own metrics. `failures` counts failures per component since
    construction.
    """

    name = "composite"

    def __init__(self, components: Sequence[Component]) -> None:
        if not components:
            raise ValueError("a composite reward needs at least one component")
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"reward component {duplicates[0]!r} appears twice: give each a distinct label"
            )
        for c in components:
            if c.fallback != "skip" and not (
                isinstance(c.fallback, int | float) and math.isfinite(c.fallback)
            ):
                raise ValueError(
                    f"reward {c.name!r}: fallback must be 'skip' or a finite number, got {c.fallback!r}"
                )
        self.components = list(components)
        self.failures: Counter[str] = Counter()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        _check_aligned(prompts, completions, fields)
        started = time.monotonic()
        futures = [
            _start_in_thread(c.name, c.fn, prompts, completions, **fields) for c in self.components
        ]
        results = []
        for c, future in zip(self.components, futures, strict=True):
            remaining = None if c.timeout_s is None else c.timeout_s - (time.monotonic() - started)
            try:
                output = future.result(timeout=None if remaining is None else max(0.0, remaining))
            except cf.TimeoutError:
                output = _Failure(f"timed out after {c.timeout_s}s")
            except RewardSetupError:
                raise
            except Exception as error:
                output = _Failure(f"raised {type(error).__name__}: {error}")
            results.append(self._checked(c, output, len(completions), time.monotonic() - started))
        return self._combine(results, len(completions))

    async def acall(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        """As `__call__`, awaiting the components that have `acall` on the running loop."""
        _check_aligned(prompts, completions, fields)

        async def one(c: Component) -> tuple[Component, RewardOutput | _Failure, float]:
            started = time.monotonic()
            if hasattr(c.fn, "acall"):
                pending = c.fn.acall(prompts, completions, **fields)
            else:
                pending = asyncio.wrap_future(
                    _start_in_thread(c.name, c.fn, prompts, completions, **fields)
                )
            try:
                output = await asyncio.wait_for(pending, timeout=c.timeout_s)
            except TimeoutError:
                output = _Failure(f"timed out after {c.timeout_s}s")
            except RewardSetupError:
                raise
            except Exception as error:
                output = _Failure(f"raised {type(error).__name__}: {error}")
            return self._checked(c, output, len(completions), time.monotonic() - started)

        results = await asyncio.gather(*(one(c) for c in self.components))
        return self._combine(list(results), len(completions))

    def _checked(
        self, c: Component, output: Any, count: int, seconds: float
    ) -> tuple[Component, RewardOutput | _Failure, float]:
        if not isinstance(output, _Failure):
            try:
                output = check_output(output, count, c.name)
            except RewardError as error:
                output = _Failure(str(error))
        if isinstance(output, _Failure):
            self.failures[c.name] += 1
            log.warning(
                "reward %r failed: %s; fallback %s for %d completions",
                c.name,
                output.reason,
                "skip" if c.fallback == "skip" else f"score {c.fallback}",
                count,
            )
        return c, output, seconds

    def _combine(
        self, results: list[tuple[Component, RewardOutput | _Failure, float]], count: int
    ) -> RewardOutput:
        total = [0.0] * count
        skipped = [False] * count
        components: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        steps: list[list[tuple[int, float]]] = [[] for _ in range(count)]
        has_steps = False
        for c, output, seconds in results:
            failed = isinstance(output, _Failure)
            if isinstance(output, _Failure):
                output = _fallback_output(c.fallback, count)
            own_skipped = output.skipped or [False] * count
            scores = [
                math.nan if s else float(v) for v, s in zip(output.scores, own_skipped, strict=True)
            ]
            components[c.name] = scores
            for sub, values in output.components.items():
                components[f"{c.name}/{sub}"] = list(values)
            for i in range(count):
                if own_skipped[i]:
                    skipped[i] = True
                else:
                    total[i] += c.weight * scores[i]
            if output.step_scores is not None:
                has_steps = True
                for i, step in enumerate(output.step_scores):
                    steps[i] += [(end, c.weight * score) for end, score in step]
            kept = [s for s in scores if not math.isnan(s)]
            metrics.update(output.metrics)
            metrics[f"reward/{c.name}/failures"] = float(failed)
            metrics[f"reward/{c.name}/mean"] = sum(kept) / len(kept) if kept else math.nan
            metrics[f"reward/{c.name}/seconds"] = seconds
        return RewardOutput(
            [math.nan if s else t for t, s in zip(total, skipped, strict=True)],
            components=components,
            step_scores=[sorted(s) for s in steps] if has_steps else None,
            skipped=skipped if any(skipped) else None,
            metrics=metrics,
        )


@dataclass(frozen=True)
class _Failure:
    reason: str


def _fallback_output(fallback: Fallback, count: int) -> RewardOutput:
    if fallback == "skip":
        return RewardOutput([math.nan] * count, skipped=[True] * count)
    return RewardOutput([float(fallback)] * count)


def _check_aligned(
    prompts: Sequence[str], completions: Sequence[str], fields: dict[str, Sequence[Any]]
) -> None:
    for label, column in {"prompts": prompts, **fields}.items():
        if len(column) != len(completions):
            raise ValueError(
                f"rewards: {label!r} has {len(column)} entries for {len(completions)} completions "
                "(every field needs one entry per completion)"
            )
