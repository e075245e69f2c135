"""Asynchronous rollouts: which weights sample each step, the cap on staleness, decoupled PPO's
behaviour weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from posttrain.online import sampler_gap
from posttrain.online.asynchronous import (
    AsyncRollouts,
    behaviour_copy,
    behaviour_weights,
    staleness_steps,
)
from posttrain.recipes.grpo import reweight_stale
from tests.unit.test_grpo import rollouts as make_rollouts


def test_staleness_counts_whole_steps_of_optimizer_steps():
    assert staleness_steps(0, 1) == 0
    assert staleness_steps(2, 1) == 2
    assert staleness_steps(3, 2) == 1  # 2 optimizer steps a step: a lag of 1 step is 2
    assert staleness_steps(1, 2) == 0  # less than a step: synchronous


@pytest.mark.parametrize("lag", [1, 2])
def test_each_step_is_sampled_with_the_weights_of_step_minus_lag_never_older(lag):
    """A learner that takes one 'step' (adds 1 to every weight) per step: the thread must
    sample step k with the weights after step max(k - lag, start), and never run further
    ahead than that (it would need weights that do not exist yet)."""
    policy = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(policy.weight)
    behaviour = behaviour_copy(policy)
    seen: dict[int, float] = {}
    started: list[int] = []

    def produce(step: int) -> int:
        started.append(step)
        seen[step] = float(behaviour.weight[0, 0])  # which weights sample this step
        return step * 10

    steps = range(3, 10)  # a resumed run: steps 3..9, the weights after 3 steps at hand
    with torch.no_grad():
        policy.weight.fill_(3.0)
    pipeline = AsyncRollouts(produce, policy, behaviour, lag, steps)
    try:
        for step in steps:
            result, version = pipeline.get(step)
            assert result == step * 10 and version == max(step - lag, steps.start)
            time.sleep(0.05)  # training; the thread may only run `lag` steps ahead
            assert max(started) <= step + lag, "sampled with weights the learner had not made"
            with torch.no_grad():
                policy.weight.add_(1.0)  # the optimizer step: weights after step + 1 steps
            pipeline.publish(step + 1)
    finally:
        pipeline.close()
    assert seen == {k: float(max(k - lag, 3)) for k in steps}
    assert set(pipeline.snapshots) == {steps.stop - 1 - lag}  # older ones were dropped


def test_an_error_in_the_rollout_thread_reaches_the_learner():
    policy = torch.nn.Linear(2, 2)

    def produce(step: int) -> int:
        if step == 1:
            raise ValueError("reward server down")
        return step

    pipeline = AsyncRollouts(produce, policy, behaviour_copy(policy), 1, range(0, 4))
    assert pipeline.get(0) == (0, 0)
    with pytest.raises(RuntimeError, match="rollout thread failed") as error:
        pipeline.get(1)
    assert isinstance(error.value.__cause__, ValueError)
    pipeline.close()
    assert not any(t.name == "async-rollouts" and t.is_alive() for t in threading.enumerate())


def test_behaviour_weights_by_hand():
    prox = torch.tensor([-1.0, -2.0, -0.5])
    behaviour = torch.tensor([-1.0, -1.0, -3.0])
    # exp(0) = 1; exp(-1) = 0.3679; exp(2.5) = 12.18 truncated at 5
    expected = torch.tensor([1.0, 0.36787944, 5.0])
    torch.testing.assert_close(behaviour_weights(prox, behaviour, cap=5.0), expected)


def test_reweight_stale_scales_advantages_and_reports_over_trained_policy_tokens():
    group = make_rollouts(0, groups=((2, (2, 2)),))
    a, b = group
    a.advantages, b.advantages = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    a.sampler_logprobs, a.old_logprobs = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    b.sampler_logprobs, b.old_logprobs = torch.tensor([-3.0, -1.0]), torch.tensor([-1.0, -1.0])
    b.completion_mask = torch.tensor([True, False])  # the second token an observation
    metrics = reweight_stale(group, [True, True], lag=2, cap=5.0)
    torch.testing.assert_close(a.advantages, torch.tensor([1.0, -2.0 * 2.7182817]))
    torch.testing.assert_close(b.advantages, torch.tensor([0.5 * 5.0, 0.5]))
    # weights over the trained policy tokens: 1, e, 5 (b's masked token left out)
    assert metrics["staleness"] == 2.0
    assert metrics["staleness/behaviour_weight"] == pytest.approx((1 + 2.7182817 + 5) / 3)
    assert metrics["staleness/truncated_fraction"] == pytest.approx(1 / 3)
    gap = sampler_gap(group)["sampler_logprob_gap/mean"]  # the gap, logged once, by sampler_gap
    assert gap == pytest.approx((0 + 1 + 2) / 3)
