"""Prompt sources by config name, each with the reward that checks it.

    TASKS[name].make(split, size, seed, **options) -> [{"id", "prompt", ...fields}, ...]
    TASKS[name].rewards -> default reward specs for posttrain.rewards.build_composite

Rows are the prompt records `posttrain.data` loads (extra keys land in `PromptRecord.fields`),
so they can also be written to JSONL and read back. Splits are "train" and "eval", disjoint
(and "all" for the IFEval benchmark); the same seed gives the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.tasks import arithmetic


@dataclass(frozen=True)
class Task:
    """A prompt source: `make(split, size, seed, **options)` and its default reward specs."""

    make: Callable[..., list[dict]]
    rewards: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


def make_arithmetic(
    split: str, size: int, seed: int = 0, *, max_operand: int = 99, operators: str = "+-"
) -> list[dict]:
    """`size` problems like `37+08=` (answer `45`) from posttrain/tasks/arithmetic.py. The
    problems are shuffled by `seed`; "train" takes them from the front and "eval" from the
    back, so the two are disjoint while their sizes add up to at most the number of problems
    (20000 at max_operand 99 with both operators)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    total = len(set(operators)) * (max_operand + 1) ** 2
    if size > total // 2:
        raise ValueError(f"arithmetic: at most {total // 2} problems per split, asked for {size}")
    options = dict(max_operand=max_operand, seed=seed, operators=operators)
    if split == "train":
        return arithmetic.make_split(size, 0, **options)[0]
    return arithmetic.make_split(total - size, size, **options)[1]


def _gsm_symbolic(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import gsm_symbolic

    return gsm_symbolic.make(*args, **options)


def _ifeval(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import ifeval

    return ifeval.make(*args, **options)


def _reasoning_gym(*args: Any, **options: Any) -> list[dict]:
    from posttrain.tasks import procedural

    return procedural.make(*args, **options)


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        make_arithmetic,
        [{"name": "exact_match"}],
        "two-digit addition and subtraction, answer alone (the quickstart and GRPO demo)",
    ),
    "gsm_symbolic": Task(
        _gsm_symbolic,
        [{"name": "math"}],
        "GSM8K-style word problems from multilingual-gsm-symbolic templates; option language",
    ),
    "ifeval": Task(
        _ifeval,
        [{"name": "ifeval"}],
        "the 541 IFEval prompts with verifiable instructions; splits all, train, eval",
    ),
    "reasoning_gym": Task(
        _reasoning_gym,
        [{"name": "reasoning_gym"}],
        "a reasoning-gym generator; options dataset (e.g. chain_sum) and config",
    ),
}
