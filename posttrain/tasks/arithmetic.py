"""A procedurally generated arithmetic task with an exact-match check.

Prompts look like `37+08=` and the answer is the number alone (`45`). Operands are
zero-padded to two digits so that digit positions line up, which a tiny model learns in minutes. Train and
held-out splits are disjoint by operand pair, so held-out accuracy measures generalisation,
not memorisation.

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

OPERATORS = ("+", "-")


def _all_problems(max_operand: int, operators: str) -> list[tuple[int, str, int]]:
    return [
        (a, op, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        for op in OPERATORS
        if op in operators
    ]


def make_split(
    n_train: int,
    n_eval: int,
    *,
    max_operand: int = 99,
    seed: int = 0,
    operators: str = "+-",
    worked: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval rows `{id, prompt, completion, answer}`. `operators` picks
    from "+-"; with `worked` the completions are `worked_solution`s (two-digit addition only),
    else the bare answer."""
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators: expected some of {''.join(OPERATORS)!r}, got {operators!r}")
    if worked and (operators != "+" or max_operand > 99):
        raise ValueError("worked solutions are written for two-digit addition: set operators='+'")
    problems = _all_problems(max_operand, operators)
    if n_train + n_eval > len(problems):
        raise ValueError(f"only {len(problems)} distinct problems with max_operand={max_operand}")
    random.Random(seed).shuffle(problems)
    rows = [_row(i, *p, worked=worked) for i, p in enumerate(problems[: n_train + n_eval])]
    return rows[:n_train], rows[n_train:]


def _row(i: int, a: int, op: str, b: int, worked: bool = False) -> dict:
    answer = a + b if op == "+" else a - b
    return {
        "id": f"arith-{i}",
        "prompt": f"{a:02d}{op}{b:02d}=",
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


def is_correct(completion: str, reference: str) -> bool:
    """The final answers agree exactly (`reference` is a bare or a worked completion)."""
    return final_answer(completion) == final_answer(reference)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
