"""Tasks: sizes, determinism by seed, disjoint train and held-out splits, rows that the prompt
loader accepts, and each task's default reward scoring the task's own gold answer as right."""

from __future__ import annotations

import json

import pytest

from posttrain.data.loading import load_records
from posttrain.rewards import build_composite
from posttrain.tasks import TASKS

# (task, options, train size, eval size, a completion built from a row that must score 1)
CASES = [
    ("arithmetic", {}, 40, 10, lambda row: row["answer"]),
    ("gsm_symbolic", {}, 12, 4, lambda row: f"Working... so \\boxed{{{row['answer']}}}"),
    (
        "reasoning_gym",
        {"dataset": "chain_sum"},
        20,
        5,
        lambda row: f"<answer>{row['answer']}</answer>",
    ),
    (
        "reasoning_gym",
        {"dataset": "spell_backward"},
        20,
        5,
        lambda row: f"<answer>{row['answer']}</answer>",
    ),
]


@pytest.mark.parametrize(
    ("name", "options", "n_train", "n_eval", "gold"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_task_sizes_determinism_disjointness_and_gold_scores_one(
    name, options, n_train, n_eval, gold, tmp_path
):
    task = TASKS[name]
    train = task.make("train", n_train, 0, **options)
    held_out = task.make("eval", n_eval, 0, **options)
    assert (len(train), len(held_out)) == (n_train, n_eval)
    assert task.make("train", n_train, 0, **options) == train
    assert task.make("train", n_train, 1, **options) != train
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == n_train  # no duplicates inside a split
    assert not set(prompts) & {r["prompt"] for r in held_out}
    # held-out questions stay out of a train split drawn with another seed too
    assert not {r["prompt"] for r in task.make("train", n_train, 7, **options)} & {
        r["prompt"] for r in held_out
    }

    rows = train + held_out
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path, "prompt")
    assert [r.prompt for r in records] == [r["prompt"] for r in rows]
    fields = {k: [rec.fields.get(k) for rec in records] for k in records[0].fields}

    composite = build_composite(task.rewards)
    try:
        right = composite([r.prompt for r in records], [gold(r) for r in rows], **fields)
        wrong = composite(
            [r.prompt for r in records], ["<answer>no idea</answer>"] * len(rows), **fields
        )
    finally:
        for c in composite.components:
            getattr(c.fn, "close", lambda: None)()
    first = task.rewards[0]["name"]
    assert right.components[first] == [1.0] * len(rows)
    assert max(wrong.components[first]) < 1.0  # spell_backward gives partial credit, never full


def test_ifeval_task_splits_partition_the_541_prompts():
    task = TASKS["ifeval"]
    everything = task.make("all", None, 0)
    train, held_out = task.make("train", None, 0), task.make("eval", None, 0)
    assert len(everything) == 541
    assert len(train) + len(held_out) == 541
    assert not {r["key"] for r in train} & {r["key"] for r in held_out}
    sample = task.make("train", 50, 3)
    assert (
        len(sample) == 50
        and sample == task.make("train", 50, 3)
        and sample != task.make("train", 50, 4)
    )
    assert {"instruction_id_list", "kwargs"} <= set(sample[0])
    with pytest.raises(ValueError, match="has 443 prompts, asked for 500"):
        task.make("train", 500, 0)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="split: expected"):
        TASKS["reasoning_gym"].make("test", 5, 0)
    with pytest.raises(ValueError, match="split: expected"):
        TASKS["arithmetic"].make("validation", 5, 0)


def test_worked_solutions_are_right_for_every_two_digit_sum_and_math_verify_reads_them():
    from posttrain.rewards import build_reward
    from posttrain.tasks import arithmetic

    # here's the arithmetic: 37 + 08: units 7 + 8 = 15 (carry 1), tens 3 + 0 + 1 = 4 -> 45
    assert arithmetic.worked_solution(37, 8) == "7+8=15, 3+0+1=4, 45"
    assert arithmetic.worked_solution(95, 87) == "5+7=12, 9+8+1=18, 182"
    assert arithmetic.worked_solution(3, 4) == "3+4=7, 0+0=0, 7"
    for a in range(100):
        for b in range(100):
            steps = arithmetic.worked_solution(a, b).split(", ")
            units, tens, answer = steps
            lhs, rhs = units.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)
            lhs, rhs = tens.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)
            assert int(answer) == a + b == int(rhs) * 10 + int(units.split("=")[1]) % 10

    train, held_out = arithmetic.make_split(2000, 500, operators="+", worked=True)
    assert all(r["completion"].count(", ") == 2 for r in train + held_out)
    assert all("+" in r["prompt"] for r in train + held_out)
    assert all(arithmetic.is_correct(r["completion"], r["answer"]) for r in train + held_out)
    assert not arithmetic.is_correct("7+8=15, 3+0+1=4, 46", "45")
    # the GRPO demo's verifier: math-verify on the last field, whether bare or worked
    math = build_reward("math", extract="full", answer_pattern=arithmetic.FINAL_ANSWER_PATTERN)
    try:
        scores = math(
            ["37+08="] * 5,
            ["45", "7+8=15, 3+0+1=4, 45", "7+8=15, 3+0+1=4, 44", "7+8=15, 3+0+1=4", "4 5"],
            answer=["45"] * 5,
        ).scores
    finally:
        math.close()
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_arithmetic_options_are_checked():
    from posttrain.tasks import arithmetic

    with pytest.raises(ValueError, match="operators='\\+'"):
        arithmetic.make_split(10, 10, worked=True)
    with pytest.raises(ValueError, match="operators: expected"):
        arithmetic.make_split(10, 10, operators="*")
    # the default data is unchanged by the new options: bare answers, both operators
    train, _ = arithmetic.make_split(500, 0)
    assert {r["prompt"][2] for r in train} == {"+", "-"}
    assert all(r["completion"] == r["answer"] for r in train)
