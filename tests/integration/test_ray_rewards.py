"""Rewards scored in Ray actors on a local Ray (skipped without Ray): the same scores as in
this process, and an actor that dies is replaced without losing or repeating anything."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from posttrain.rewards.base import RewardOutput
from posttrain.train.metrics import read_metrics
from tests.integration.test_grpo_runs import config, digit_fraction

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration
DIGITS = "tests.integration.test_grpo_runs:digit_fraction"


def dies_once(marker: str, at_call: int = 3):
    """`digit_fraction`, except that the first actor to reach its `at_call`-th call kills its
    own process in the middle of it (once in all: `marker` is created on the way out)."""
    calls = 0

    def reward(prompts, completions, **fields) -> RewardOutput:
        nonlocal calls
        calls += 1
        if calls == at_call:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return digit_fraction(prompts, completions, **fields)

    return reward


def always_dies(prompts, completions, **fields) -> RewardOutput:  # noqa: ARG001
    os._exit(1)


def wait_until_dead(actor) -> None:
    """`ray.kill` returns before the actor is gone: call it until a call fails."""
    for _ in range(100):
        try:
            ray.get(actor.score.remote(["p"], ["1"], {}), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


@pytest.fixture(scope="module")
def local_ray():
    from posttrain.rewards.ray_pool import connect

    connect()  # a local Ray, as a recipe starts one
    yield
    ray.shutdown()


def test_scores_match_in_process_and_a_killed_actor_is_replaced(local_ray):
    from posttrain.rewards.ray_pool import RayRewardFunction

    fn = RayRewardFunction(DIGITS, {}, workers=2)
    prompts = [f"p{i}" for i in range(9)]
    completions = ["12a", "b", "333", "x1", "", "99", "a", "7", "zz9"]
    expected = digit_fraction(prompts, completions).scores
    assert fn(prompts, completions).scores == expected
    dead = fn.actors[0]
    ray.kill(dead)  # a lost node, an OOM kill
    wait_until_dead(dead)
    again = fn(prompts, completions)
    assert again.scores == expected and fn.restarts == 1
    assert again.metrics["ray/digit_fraction/restarts"] == 1.0

    doomed = RayRewardFunction("tests.integration.test_ray_rewards:always_dies", {}, 2,
                               max_restarts=2)  # fmt: skip
    with pytest.raises(RuntimeError, match="killed 3 actors in a row"):
        doomed(prompts, completions)


def test_grpo_with_rewards_in_ray_actors_matches_the_in_process_run(
    local_ray, tiny_qwen2, tmp_path
):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(f'{{"prompt": "{i:02d}+{i % 7:02d}="}}\n' for i in range(64)))
    steps = dict(run__max_steps=5, grpo__prompts_per_step=6, grpo__group_size=4)
    marker = tmp_path / "died"
    flaky = [{"name": "tests.integration.test_ray_rewards:dies_once",
              "options": {"marker": str(marker)}}]  # fmt: skip
    from posttrain.recipes import grpo

    grpo.run(config(tiny_qwen2, rows, tmp_path / "local", **steps))
    grpo.run(config(tiny_qwen2, rows, tmp_path / "ray", rewards=flaky,
                    ray={"reward_workers": 2}, **steps))  # fmt: skip
    assert marker.exists(), "no actor died"
    local, remote = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "ray")
    assert [m["step"] for m in remote] == [m["step"] for m in local]  # each step logged once
    for a, b in zip(local, remote, strict=True):
        for key in ("reward", "eval/reward", "loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
    assert sum(m.get("ray/dies_once/restarts", 0) for m in remote) == 1
    assert Path(tmp_path / "ray" / "final").exists()
