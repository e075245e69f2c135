"""The composite reward: weighted sum, per-component logging, and the fallback policy for
rewards that raise, return NaN or run too long (sync and async), with failure counts."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest

from posttrain.rewards import REWARDS, RewardOutput, build_composite, build_reward
from posttrain.rewards.composite import Component, CompositeReward


class Length:
    name = "length"

    def __call__(self, prompts, completions, **fields):
        return RewardOutput(
            [float(len(c)) for c in completions], components={"chars": [1.0] * len(completions)}
        )


class Raises:
    name = "raises"

    def __call__(self, prompts, completions, **fields):
        raise KeyError("answer")


class ReturnsNaN:
    name = "nan"

    def __call__(self, prompts, completions, **fields):
        return RewardOutput([1.0] + [math.nan] * (len(completions) - 1))


class Slow:
    name = "slow"

    def __call__(self, prompts, completions, **fields):
        time.sleep(2.0)
        return RewardOutput([1.0] * len(completions))


COMPLETIONS = ["ab", "abcd"]


def test_weighted_sum_with_components_named_after_each_reward():
    composite = CompositeReward(
        [Component("length", Length(), 0.5), Component("exact", build_reward("exact_match"), 2.0)]
    )
    out = composite(["p", "p"], COMPLETIONS, answer=["ab", "x"])
    # here's the maths: 0.5 * [2, 4] + 2 * [1, 0] = [3, 2]
    assert out.scores == [3.0, 2.0]
    assert out.components == {"length": [2.0, 4.0], "length/chars": [1.0, 1.0], "exact": [1.0, 0.0]}
    assert out.metrics["reward/length/mean"] == 3.0
    assert out.metrics["reward/exact/failures"] == 0.0
    assert out.skipped is None


def test_raising_reward_falls_back_to_its_fixed_score_with_one_log_line(caplog):
    composite = CompositeReward(
        [Component("length", Length()), Component("raises", Raises(), 1.0, fallback=-1.0)]
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards.composite"):
        out = composite(["p", "p"], COMPLETIONS)
    assert out.scores == [1.0, 3.0]  # [2, 4] + the fallback -1
    assert out.components["raises"] == [-1.0, -1.0]
    assert out.metrics["reward/raises/failures"] == 1.0
    assert composite.failures["raises"] == 1
    [record] = caplog.records
    assert "'raises'" in record.getMessage() and "KeyError" in record.getMessage()


def test_nan_reward_is_skipped_and_counted(caplog):
    composite = CompositeReward(
        [Component("length", Length()), Component("nan", ReturnsNaN(), fallback="skip")]
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards.composite"):
        out = composite(["p", "p"], COMPLETIONS)
        composite(["p", "p"], COMPLETIONS)
    assert out.skipped == [True, True]
    assert all(math.isnan(s) for s in out.scores)  # never a made-up number
    assert composite.failures["nan"] == 2
    assert len(caplog.records) == 2 and "not a finite number" in caplog.records[0].getMessage()


def test_slow_reward_times_out_without_blocking(caplog):
    composite = CompositeReward(
        [Component("length", Length()), Component("slow", Slow(), fallback=0.0, timeout_s=0.2)]
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="posttrain.rewards.composite"):
        out = composite(["p", "p"], COMPLETIONS)
    assert time.monotonic() - started < 1.5
    assert out.scores == [2.0, 4.0]
    assert out.metrics["reward/slow/failures"] == 1.0
    assert "timed out after 0.2s" in caplog.records[0].getMessage()


def test_async_runs_components_concurrently_and_applies_the_same_fallbacks():
    class AsyncHalf:
        name = "half"

        async def acall(self, prompts, completions, **fields):
            await asyncio.sleep(0.05)
            return RewardOutput([0.5] * len(completions))

        def __call__(self, prompts, completions, **fields):
            raise AssertionError("acall should be used")

    composite = CompositeReward(
        [
            Component("half", AsyncHalf()),
            Component("raises", Raises(), fallback=0.0),
            Component("slow", Slow(), fallback="skip", timeout_s=0.2),
        ]
    )
    started = time.monotonic()
    out = asyncio.run(composite.acall(["p", "p"], COMPLETIONS))
    assert time.monotonic() - started < 1.5
    assert out.skipped == [True, True]
    assert out.components["half"] == [0.5, 0.5]
    assert composite.failures == {"raises": 1, "slow": 1}


def test_a_component_that_skips_some_completions_skips_them_in_the_sum():
    class SkipsFirst:
        name = "skips"

        def __call__(self, prompts, completions, **fields):
            return RewardOutput([math.nan, 1.0], skipped=[True, False])

    out = CompositeReward([Component("length", Length()), Component("skips", SkipsFirst())])(
        ["p", "p"], COMPLETIONS
    )
    assert out.skipped == [True, False]
    assert math.isnan(out.scores[0]) and out.scores[1] == 5.0


def test_misaligned_field_is_named():
    composite = CompositeReward([Component("length", Length())])
    with pytest.raises(ValueError, match="'answer' has 1 entries for 2 completions"):
        composite(["p", "p"], COMPLETIONS, answer=["x"])


def test_build_composite_from_specs_and_its_errors():
    composite = build_composite(
        [
            {"name": "exact_match", "weight": 1.0},
            {"name": "regex", "weight": 0.5, "label": "has_digit", "options": {"pattern": r"\d"}},
        ]
    )
    out = composite(["p", "p"], ["7", "seven"], answer=["7", "7"])
    assert out.scores == [1.5, 0.0]
    assert set(out.components) == {"exact_match", "has_digit"}
    with pytest.raises(ValueError, match="did you mean 'exact_match'"):
        build_composite([{"name": "exact_mach"}])
    with pytest.raises(
        ValueError, match=r"rewards\[0\]: wieght: unknown key \(did you mean 'weight'\?\)"
    ):
        build_composite([{"name": "math", "wieght": 1.0}])
    with pytest.raises(ValueError, match="appears twice"):
        build_composite([{"name": "format"}, {"name": "format"}])
    with pytest.raises(ValueError, match="bad options"):
        build_reward("regex", patern="x")


def test_registry_names_every_reward_of_the_issue():
    assert set(REWARDS) >= {
        "math", "ifeval", "reasoning_gym", "exact_match", "regex", "format", "length",
        "overlong", "repetition", "sentiment", "code", "reward_model",
    }  # fmt: skip
