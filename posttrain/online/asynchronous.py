"""Asynchronous rollouts: the next steps' rollouts are sampled while this step trains.

A thread samples step k with a copy of the policy (the behaviour policy) holding the weights the
learner had after step k - lag, where lag = `max_staleness` // (optimizer steps a sampling
step): so a rollout is never more than `max_staleness` optimizer steps behind the policy that
trains on it, and always exactly that many once the run is past its first steps (the lag is a
function of the step, so a run samples the same whatever the timing). `max_staleness` 0 is the
synchronous loop. The learner publishes its weights after each step (`publish`); the thread
loads the snapshot a step needs into its copy before sampling it, then drops older ones.

Training on stale rollouts needs the off-policy correction of decoupled PPO (Hilton et al.
2022, "Batch size-invariance for policy optimization", Sec. 3; AReaL, Fu et al. 2025, Sec. 5):
the clipped ratio is taken against the proximal policy (the learner's weights at the start of
the step, recomputed), and each token is weighted by pi_prox / pi_behaviour
(`behaviour_weights`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch


def staleness_steps(max_staleness: int, updates_per_step: int) -> int:
    """How many sampling steps a rollout may lag: whole steps of `updates_per_step` optimizer
    steps that fit in `max_staleness` optimizer steps."""
    return max_staleness // max(updates_per_step, 1)


def behaviour_weights(prox: torch.Tensor, behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """Decoupled PPO's per-token importance weights exp(log pi_prox - log pi_behaviour),
    truncated at `cap` (as V-trace truncates its weights): how much more likely the proximal
    policy makes each sampled token than the policy that sampled it."""
    return (prox - behaviour).exp().clamp(max=cap)


class AsyncRollouts:
    """Produce `produce(step, sampler_model)`'s result for every step of `steps` in a
    background thread, sampling step k with the weights `policy` had after step
    max(k - lag, steps.start). `get(step)` returns `(result, version)`: version is the step
    whose weights sampled it."""

    def __init__(
        self,
        produce: Callable[[int], Any],
        policy: torch.nn.Module,
        behaviour: torch.nn.Module,
        lag: int,
        steps: range,
    ):
        self.produce, self.policy, self.behaviour = produce, policy, behaviour
        self.lag, self.steps = lag, steps
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {steps.start: self._snapshot()}
        self.results: dict[int, tuple[Any, int]] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="async-rollouts", daemon=True)
        self.thread.start()

    def version_for(self, step: int) -> int:
        """The step whose weights sample `step`."""
        return max(step - self.lag, self.steps.start)

    def publish(self, done: int) -> None:
        """The learner has finished `done` steps: keep its weights if a later step samples
        with them."""
        if done < self.steps.stop and any(self.version_for(k) == done for k in self.steps):
            snapshot = self._snapshot()
            with self.changed:
                self.snapshots[done] = snapshot
                self.changed.notify_all()

    def get(self, step: int) -> tuple[Any, int]:
        """Step `step`'s result and the version that sampled it (waits for the thread)."""
        with self.changed:
            self.changed.wait_for(lambda: step in self.results or self.error is not None)
            if step not in self.results:  # what was sampled before the failure still trains
                raise RuntimeError("the rollout thread failed") from self.error
            return self.results.pop(step)

    def close(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        self.thread.join(timeout=60)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def _loop(self) -> None:
        loaded = None
        try:
            for step in self.steps:
                version = self.version_for(step)
                with self.changed:
                    ready = lambda v=version: v in self.snapshots or self.stopped  # noqa: E731
                    self.changed.wait_for(ready)
                    if self.stopped:
                        return
                    snapshot = self.snapshots[version]
                    for old in [v for v in self.snapshots if v < version]:
                        del self.snapshots[old]
                if loaded != version:
                    self.behaviour.load_state_dict(snapshot)
                    loaded = version
                result = self.produce(step)
                with self.changed:
                    self.results[step] = (result, version)
                    self.changed.notify_all()
        except BaseException as error:  # re-raised in the learner's thread by `get`
            with self.changed:
                self.error = error
                self.changed.notify_all()


def behaviour_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `policy` for the rollout thread to sample with."""
    module = getattr(policy, "module", policy)
    return copy.deepcopy(module).eval().requires_grad_(False)
