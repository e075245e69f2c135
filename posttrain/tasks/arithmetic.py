"""A procedurally generated arithmetic task with an exact-match check.

Prompts look like `37+08=` and the answer is the number alone (`45`). Operands are
zero-padded to two digits so that digit positions line up, which a tiny model learns in minutes.

What is held out is the unordered operand pair: every problem on the numbers {37, 8}
(`37+08=`, `08+37=`, `37-08=`, `08-37=`) lands in the same split. So no held-out `a+b` has
its mirror `b+a`, or a subtraction of the same two numbers, in training, and held-out accuracy
measures generalisation to unseen pairs, not memorisation. `make_split` holds out whole pairs
in a seeded order (for `posttrain arithmetic`'s files, which may use every problem); `make` (the
`arithmetic` task) holds out the pairs whose hash falls in the first `eval_fraction`
(posttrain/tasks/splits.py), whatever the seed and size.

With `worked=True` the demonstrations work the sum out column by column before the answer
(`37+08=` -> `7+8=15, 3+0+1=4, 45`), GSM8K-style: reasoning, then the final answer, which is
always the last comma-separated field. Every step is a copy or a one-digit sum, so a tiny model
that has learned the steps generalises to unseen operand pairs; briefly SFT'd, it still slips,
which is the start the GRPO demo improves from (docs/grpo.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.tasks.splits import check_split, is_held_out

OPERATORS = ("+", "-")

Problem = tuple[int, str, int]


def _check_options(max_operand: int, operators: str, worked: bool) -> None:
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators: expected some of {''.join(OPERATORS)!r}, got {operators!r}")
    if max_operand < 0:
        raise ValueError(f"max_operand: expected a number >= 0, got {max_operand}")
    if worked and operators != "+":
        raise ValueError("worked solutions are written for two-digit addition: set operators='+'")
    if worked and max_operand > 99:
        raise ValueError(
            f"worked solutions are written for two-digit addition: max_operand {max_operand} > 99"
        )


def problems_by_pair(max_operand: int, operators: str) -> list[list[Problem]]:
    """Every problem `(a, op, b)`, grouped by the unordered operand pair {a, b}: a pair of two
    different numbers holds both orders under each operator, a pair a == b one problem per
    operator. At max_operand 99: 5050 pairs, 10000 problems with "+", 20000 with "+-"."""
    ops = [op for op in OPERATORS if op in operators]
    return [
        [(x, op, y) for op in ops for x, y in ([(a, b), (b, a)] if a != b else [(a, b)])]
        for a in range(max_operand + 1)
        for b in range(a, max_operand + 1)
    ]


def _hold_out(pairs: list[list[Problem]], n: int) -> tuple[list[Problem], list[list[Problem]]]:
    """`n` problems made of whole pairs taken in order, and the pairs left over. A pair that
    would overflow `n` is passed over (left for training) while a later, smaller one still
    fits (with "+" a pair a == b has one problem, so `n` is always met exactly). When none
    fits, the smallest pair left is cut to fit and its other problems are used nowhere."""
    held_out: list[Problem] = []
    left: list[list[Problem]] = []
    for pair in pairs:
        if len(held_out) + len(pair) <= n:
            held_out += pair
        else:
            left.append(pair)
    if len(held_out) < n:  # every pair left is larger than what is missing
        cut = left.pop(min(range(len(left)), key=lambda i: len(left[i])))
        held_out += cut[: n - len(held_out)]
    return held_out, left


def make_split(
    n_train: int,
    n_eval: int,
    *,
    max_operand: int = 99,
    seed: int = 0,
    operators: str = "+-",
    worked: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Train and eval rows `{id, prompt, completion, answer}`, `n_train` and `n_eval` of
    them, that share no unordered operand pair. `seed` shuffles the pairs; the held-out rows
    are whole pairs from the front (see `_hold_out`), the train rows any `n_train` problems of
    the pairs left. `operators` picks from "+-"; with `worked` the completions are
    `worked_solution`s (two-digit addition only), else the bare answer."""
    _check_options(max_operand, operators, worked)
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train, n_eval: expected sizes >= 0, got {n_train}, {n_eval}")
    pairs = problems_by_pair(max_operand, operators)
    total = sum(map(len, pairs))
    if n_train + n_eval > total:
        raise ValueError(
            f"n_train + n_eval = {n_train + n_eval}: only {total} distinct problems with "
            f"max_operand={max_operand}, operators={operators!r}"
        )
    rng = random.Random(seed)
    rng.shuffle(pairs)
    held_out, left = _hold_out(pairs, n_eval)
    train_pool = [p for pair in left for p in pair]
    if n_train > len(train_pool):
        raise ValueError(
            f"n_train={n_train}, n_eval={n_eval}: holding out {n_eval} problems by whole "
            f"operand pairs leaves {len(train_pool)} for training (of {total}; "
            f"{total - n_eval - len(train_pool)} of a cut pair are used nowhere)"
        )
    rng.shuffle(train_pool)
    rng.shuffle(held_out)
    return (
        [_row(*p, worked=worked) for p in train_pool[:n_train]],
        [_row(*p, worked=worked) for p in held_out],
    )


def make(
    split: str,
    size: int,
    seed: int = 0,
    *,
    max_operand: int = 99,
    operators: str = "+-",
    worked: bool = False,
    eval_fraction: float = 0.1,
) -> list[dict]:
    """`size` rows `{id, prompt, completion, answer}` of `split` ("train" or "eval"). A pair
    {a, b} is held out when the hash of `"a,b"` (a <= b) falls in the first `eval_fraction`,
    so no train split shares a pair with any eval split, whatever their seeds and sizes;
    `seed` picks which problems of the split's pairs. At the defaults the eval pairs hold
    2004 problems of 20000 ("+": 1002 of 10000)."""
    check_split(split, eval_fraction)
    _check_options(max_operand, operators, worked)
    pool = [
        p
        for pair in problems_by_pair(max_operand, operators)
        for p in pair
        if is_held_out(_pair_text(p[0], p[2]), eval_fraction) == (split == "eval")
    ]
    if size > len(pool):
        raise ValueError(
            f"arithmetic: the {split} split has {len(pool)} problems (max_operand={max_operand}, "
            f"operators={operators!r}, eval_fraction={eval_fraction}), asked for {size}"
        )
    return [_row(*p, worked=worked) for p in random.Random(seed).sample(pool, size)]


def _pair_text(a: int, b: int) -> str:
    return f"{min(a, b)},{max(a, b)}"


def _row(a: int, op: str, b: int, worked: bool = False) -> dict:
    answer = a + b if op == "+" else a - b
    prompt = f"{a:02d}{op}{b:02d}="
    return {
        "id": f"arith-{prompt[:-1]}",
        "prompt": prompt,
        "completion": worked_solution(a, b) if worked else str(answer),
        "answer": str(answer),
    }


def worked_solution(a: int, b: int) -> str:
    """Column addition of two-digit operands, units first, then the answer:
    `worked_solution(37, 8) == "7+8=15, 3+0+1=4, 45"` (the `+1` is the carry)."""
    units = a % 10 + b % 10
    carry = f"+{units // 10}" if units >= 10 else ""
    tens = a // 10 + b // 10 + units // 10
    return f"{a % 10}+{b % 10}={units}, {a // 10}+{b // 10}{carry}={tens}, {a + b}"


def final_answer(text: str) -> str:
    """The last comma-separated field, stripped: the answer of a bare or a worked completion."""
    return text.rsplit(",", 1)[-1].strip()


FINAL_ANSWER_PATTERN = r"(?:^|,)\s*(-?\d+)\s*$"
"""`answer_pattern` of the `math` or `exact_match` reward for these completions: the last
field, when it is an integer."""


def default_rewards(options: dict) -> list[dict]:
    """Reward specs that judge this task's completions for the options its rows were made
    with: the whole completion must be the answer, or with `worked` the final field."""
    if options.get("worked", False):
        return [
            {
                "name": "exact_match",
                "weight": 1.0,
                "options": {"answer_pattern": FINAL_ANSWER_PATTERN},
            }
        ]
    return [{"name": "exact_match", "weight": 1.0, "options": {}}]


def is_correct(completion: str, reference: str) -> bool:
    """The final answers agree exactly (`reference` is a bare or a worked completion)."""
    return final_answer(completion) == final_answer(reference)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
