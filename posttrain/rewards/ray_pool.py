"""Reward functions run in Ray actors, so that sandboxed code, verifiers and judge calls spread
over a cluster (`ray: {reward_workers: N}` in an online recipe's config; docs/scaling.md).

Each actor builds the reward from its spec once (`build_reward(name, **options)`) and scores
the chunks it is sent. A call splits its batch into one contiguous chunk per actor and joins the
chunks' outputs in order. An actor that dies (its process killed, its node lost) is replaced by
a fresh one and its chunk is scored again there, so every completion is scored exactly once in
the output; a chunk that kills its actor `max_restarts` times in a row fails the call (the
composite's fallback then applies, as for any failing reward).

Ray is an optional dependency (`pip install 'posttrain[ray]'`). The recipe connects to
`ray.address` when set (an existing cluster) or starts a local Ray sized to this machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from posttrain.rewards.base import RewardOutput, check_output

log = logging.getLogger(__name__)

INSTALL_HINT = "Ray rewards need Ray: pip install 'posttrain[ray]' (ray==2.60.0)"


def ray_module():
    try:
        import ray
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ray


def connect(address: str = "") -> None:
    """Join the Ray cluster at `address`, or start a local one (no dashboard); a no-op when
    this process is connected already."""
    ray = ray_module()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


class _Scorer:
    """The actor: one built reward function, scoring the chunks it is sent."""

    def __init__(self, name: str, options: dict[str, Any]):
        from posttrain.rewards import build_reward

        self.fn = build_reward(name, **options)

    def score(self, prompts: list, completions: list, fields: dict[str, list]) -> RewardOutput:
        return self.fn(prompts, completions, **fields)


class RayRewardFunction:
    """The reward `name` (with `options`) scored by `workers` Ray actors; a `RewardFunction`."""

    def __init__(self, name: str, options: dict[str, Any], workers: int, *, max_restarts: int = 3):
        ray = ray_module()
        self.name, self.options, self.max_restarts = name, dict(options), max_restarts
        self._actor_class = ray.remote(num_cpus=0)(_Scorer)
        self.actors = [self._start() for _ in range(workers)]
        self.restarts = 0

    def _start(self):
        return self._actor_class.remote(self.name, self.options)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        ray = ray_module()
        n = len(completions)
        bounds = [n * k // len(self.actors) for k in range(len(self.actors) + 1)]
        chunks = [(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
        outputs: dict[int, RewardOutput] = {}
        failures = [0] * len(chunks)

        def submit(k: int):
            lo, hi = chunks[k]
            part = {name: list(values[lo:hi]) for name, values in fields.items()}
            return self.actors[k].score.remote(list(prompts[lo:hi]), list(completions[lo:hi]), part)

        pending = {submit(k): k for k in range(len(chunks))}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            try:
                outputs[k] = ray.get(done[0])
            except ray.exceptions.RayActorError as error:  # the actor died: replace, resend
                failures[k] += 1
                if failures[k] > self.max_restarts:
                    raise RuntimeError(
                        f"reward {self.name!r}: a chunk of {chunks[k][1] - chunks[k][0]} "
                        f"completions killed {failures[k]} actors in a row"
                    ) from error
                log.warning("reward %r: actor %d died (%s); restarting it", self.name, k, error)
                self.actors[k] = self._start()
                self.restarts += 1
                pending[submit(k)] = k
        parts = [check_output(outputs[k], hi - lo, self.name) for k, (lo, hi) in enumerate(chunks)]
        joined = join_outputs(parts)
        joined.metrics[f"ray/{self.name.rpartition(':')[2]}/restarts"] = float(sum(failures))
        return joined

    def close(self) -> None:
        ray = ray_module()
        for actor in self.actors:
            ray.kill(actor)


def join_outputs(parts: list[RewardOutput]) -> RewardOutput:
    """The outputs of consecutive chunks of one batch as one output (metrics: summed counts,
    the longest seconds, the mean of the rest)."""
    if len(parts) == 1:
        return parts[0]
    names = list(parts[0].components)
    step_scores = None
    if any(p.step_scores is not None for p in parts):
        step_scores = [s for p in parts for s in (p.step_scores or [[]] * len(p))]
    skipped = None
    if any(p.skipped is not None for p in parts):
        skipped = [s for p in parts for s in (p.skipped or [False] * len(p))]
    metrics: dict[str, float] = {}
    for key in {k for p in parts for k in p.metrics}:
        values = [p.metrics[key] for p in parts if key in p.metrics]
        if key.endswith(("seconds", "_s")):
            metrics[key] = max(values)
        elif key.endswith(("failures", "count", "calls")):
            metrics[key] = sum(values)
        else:
            metrics[key] = sum(values) / len(values)
    return RewardOutput(
        scores=[s for p in parts for s in p.scores],
        components={name: [v for p in parts for v in p.components[name]] for name in names},
        step_scores=step_scores,
        skipped=skipped,
        metrics=metrics,
    )
