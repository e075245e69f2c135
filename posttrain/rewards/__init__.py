"""Reward functions by config name, and composites built from config specs.

    REWARDS[name](**options) -> a reward function (see posttrain/rewards/base.py)
    build_reward("math", timeout_s=5.0)
    build_reward("my_package.rewards:brevity")   # any callable with the reward signature
    build_composite([{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}])

Each factory imports its module when called, so that importing this package stays cheap and
a reward whose optional dependency is missing fails only when it is asked for.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, ValidationError

from posttrain.config import Section
from posttrain.rewards.base import (
    RewardError,
    RewardFunction,
    RewardOutput,
    check_output,
    score_async,
)
from posttrain.rewards.composite import Component, CompositeReward, Fallback


def _math(**options: Any) -> RewardFunction:
    from posttrain.rewards.math_answer import MathReward

    return MathReward(**options)


def _ifeval(**options: Any) -> RewardFunction:
    from posttrain.rewards.ifeval import IFEvalReward

    return IFEvalReward(**options)


def _reasoning_gym(**options: Any) -> RewardFunction:
    from posttrain.rewards.reasoning_gym_reward import ReasoningGymReward

    return ReasoningGymReward(**options)


def _exact_match(**options: Any) -> RewardFunction:
    from posttrain.rewards.text_match import ExactMatchReward

    return ExactMatchReward(**options)


def _digit_match(**options: Any) -> RewardFunction:
    from posttrain.rewards.text_match import DigitMatchReward

    return DigitMatchReward(**options)


def _regex(**options: Any) -> RewardFunction:
    from posttrain.rewards.text_match import RegexReward

    return RegexReward(**options)


def _format(**options: Any) -> RewardFunction:
    from posttrain.rewards.text_match import format_reward

    return format_reward(**options)


def _length(**options: Any) -> RewardFunction:
    from posttrain.rewards.length import TargetLengthReward

    return TargetLengthReward(**options)


def _overlong(**options: Any) -> RewardFunction:
    from posttrain.rewards.length import OverlongPenalty

    return OverlongPenalty(**options)


def _repetition(**options: Any) -> RewardFunction:
    from posttrain.rewards.length import RepetitionPenalty

    return RepetitionPenalty(**options)


def _sentiment(**options: Any) -> RewardFunction:
    from posttrain.rewards.sentiment import SentimentReward

    return SentimentReward(**options)


def _code(**options: Any) -> RewardFunction:
    from posttrain.rewards.code import CodeReward

    return CodeReward(**options)


def _reward_model(path: str, **options: Any) -> RewardFunction:
    from posttrain.rewards.reward_model import RewardModelScorer

    return RewardModelScorer(path, **options)


def _reward_ensemble(paths: list[str], **options: Any) -> RewardFunction:
    from posttrain.rewards.reward_model import EnsembleRewardModel

    return EnsembleRewardModel(paths, **options)


def _prm(path: str, **options: Any) -> RewardFunction:
    from posttrain.rewards.process import ProcessRewardScorer

    return ProcessRewardScorer(path, **options)


def _judge(**options: Any) -> RewardFunction:
    from posttrain.judges import JudgeReward

    return JudgeReward(**options)


REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "math": _math,  # math-verify on the last \boxed{} vs field `answer`
    "ifeval": _ifeval,  # IFEval checkers; fields `instruction_id_list`, `kwargs`
    "reasoning_gym": _reasoning_gym,  # the task's score_answer; field `reasoning_gym` or `entry`
    "exact_match": _exact_match,  # extracted answer == field `answer`
    "digit_match": _digit_match,  # partial credit: digits agreeing with field `answer`
    "regex": _regex,  # option `pattern` matches the completion
    "format": _format,  # <think>...</think><answer>...</answer>
    "length": _length,  # closeness to a target length
    "overlong": _overlong,  # DAPO soft overlong penalty
    "repetition": _repetition,  # n-gram repetition penalty
    "sentiment": _sentiment,  # VADER compound score
    "code": _code,  # sandboxed tests; field `tests`
    "reward_model": _reward_model,  # a learned reward model; option `path`
    "reward_ensemble": _reward_ensemble,  # mean - k * std of several; options `paths`, `k`
    "prm": _prm,  # a process reward model: a score per step; option `path`
    "judge": _judge,  # an LLM judge: pairwise, pointwise or rules (posttrain.judges)
}


class RewardSpec(Section):
    """One reward of a composite, as written in a config's `rewards:` list."""

    name: str
    """Registry name of the reward (one of posttrain.rewards.REWARDS), or an import path
    `package.module:function` to any callable with the reward signature."""
    weight: float = 1.0
    """Its weight in the sum."""
    fallback: Fallback = "skip"
    """When it raises, returns NaN or times out: 'skip' marks the batch's completions skipped
    (left out of the update), a number scores them that."""
    timeout_s: float | None = 300.0
    """Wall-clock limit for one batch, in seconds; null for none."""
    label: str | None = None
    """Its name in logs and metrics (default: `name`, or an import path's attribute); needed
    when a reward appears twice."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the reward's constructor."""


def build_reward(name: str, /, **options: Any) -> RewardFunction:
    """The reward registered as `name`, built with `options`; or, for an import path
    `package.module:attribute`, that callable itself (with `options`: what calling it with them
    returns). Errors name the reward."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"reward {name!r}: cannot import it: {error}") from error
        return fn(**options) if options else fn
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint}; expected one of {sorted(REWARDS)}")
    try:
        return REWARDS[name](**options)
    except TypeError as error:  # an unknown or missing option
        raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {error}") from error


def _describe(error: Any) -> str:
    where = ".".join(map(str, error["loc"])) or "spec"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), RewardSpec.model_fields, n=1)
        return f"{where}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"{where}: {error['msg']}"


def build_composite(
    specs: Sequence[RewardSpec | dict[str, Any]], ray_workers: int = 0
) -> CompositeReward:
    """A `CompositeReward` from specs `{name, weight, fallback, timeout_s, label, options}`;
    with `ray_workers`, each function scored in that many Ray actors (`ray_pool.py`)."""
    components = []
    for i, raw in enumerate(specs):
        try:
            spec = raw if isinstance(raw, RewardSpec) else RewardSpec.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(_describe(e) for e in error.errors())
            raise ValueError(f"rewards[{i}]: {problems}") from error
        label = spec.label or spec.name.rpartition(":")[2]  # an import path: its attribute
        if ray_workers:
            from posttrain.rewards.ray_pool import RayRewardFunction

            fn = RayRewardFunction(spec.name, spec.options, ray_workers)
        else:
            fn = build_reward(spec.name, **spec.options)
        components.append(Component(label, fn, spec.weight, spec.fallback, spec.timeout_s))
    return CompositeReward(components)


__all__ = [
    "REWARDS",
    "Component",
    "CompositeReward",
    "RewardError",
    "RewardFunction",
    "RewardOutput",
    "RewardSpec",
    "build_composite",
    "build_reward",
    "check_output",
    "score_async",
]
