"""A procedurally generated arithmetic task with an exact-match check.

Prompts look like `37+08=` and the answer is the number alone (`45`). Operands are
zero-padded to two digits so that digit positions line up, which a tiny model learns in minutes. Train and
held-out splits are disjoint by operand pair, so held-out accuracy measures generalisation,
not memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPERATORS = ("+", "-")


def _all_problems(max_operand: int) -> list[tuple[int, str, int]]:
    return [
        (a, op, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        for op in OPERATORS
    ]


def make_split(
    n_train: int, n_eval: int, *, max_operand: int = 99, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval rows `{id, prompt, completion, answer}`."""
    problems = _all_problems(max_operand)
    if n_train + n_eval > len(problems):
        raise ValueError(f"only {len(problems)} distinct problems with max_operand={max_operand}")
    random.Random(seed).shuffle(problems)
    rows = [_row(i, *p) for i, p in enumerate(problems[: n_train + n_eval])]
    return rows[:n_train], rows[n_train:]


def _row(i: int, a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {
        "id": f"arith-{i}",
        "prompt": f"{a:02d}{op}{b:02d}=",
        "completion": str(answer),
        "answer": str(answer),
    }


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the whole completion, surrounding whitespace aside."""
    return completion.strip() == answer


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
