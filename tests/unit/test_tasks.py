"""Tasks: sizes, determinism by seed, disjoint train and held-out splits (for arithmetic,
disjoint by unordered operand pair), rows that the prompt loader accepts, and each task's
default rewards scoring the task's own gold completion 1 and a near miss below 1."""

from __future__ import annotations

import json
import re

import pytest

from posttrain.data.loading import load_records
from posttrain.rewards import build_composite
from posttrain.tasks import TASKS

WORKED = {"operators": "+", "worked": True}


# (task, options, train size, eval size, the completion of a row that gives a certain answer):
# the row's own answer must score 1, the answer with a digit appended (`45` -> `451`) 0, or
# below 1 where the task's scorer gives partial credit (reasoning-gym's)
CASES = [
    ("arithmetic", {}, 40, 10, lambda row, answer: answer),
    # `7+8=15, 3+0+1=4, 45`: the steps, then the answer
    (
        "arithmetic",
        WORKED,
        40,
        10,
        lambda row, answer: f"{row['completion'][: -len(row['answer'])]}{answer}",
    ),
    ("gsm_symbolic", {}, 12, 4, lambda row, answer: f"Working... so \\boxed{{{answer}}}"),
    (
        "reasoning_gym",
        {"dataset": "chain_sum"},
        20,
        5,
        lambda row, answer: f"<answer>{answer}</answer>",
    ),
    # its partial credit by similarity is about 1 for a near miss: only "no idea" must score < 1
    (
        "reasoning_gym",
        {"dataset": "spell_backward"},
        20,
        5,
        lambda row, answer: f"<answer>{answer}</answer>",
    ),
]


@pytest.mark.parametrize(
    ("name", "options", "n_train", "n_eval", "complete"),
    CASES,
    ids=[f"{c[0]}-{c[1]}" for c in CASES],
)
def test_task_sizes_determinism_disjointness_and_default_rewards(
    name, options, n_train, n_eval, complete, tmp_path
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

    specs = task.default_rewards(options)
    composite = build_composite(specs)
    prompts = [r.prompt for r in records]
    try:
        right = composite(prompts, [complete(r, r["answer"]) for r in rows], **fields)
        near = composite(prompts, [complete(r, r["answer"] + "1") for r in rows], **fields)
        wrong = composite(prompts, ["<answer>no idea</answer>"] * len(rows), **fields)
    finally:
        for c in composite.components:
            getattr(c.fn, "close", lambda: None)()
    first = specs[0]["name"]
    assert right.components[first] == [1.0] * len(rows)
    if name == "reasoning_gym":
        assert max(wrong.components[first]) < 1.0
        if options["dataset"] != "spell_backward":
            assert max(near.components[first]) < 1.0
    else:
        assert near.components[first] == wrong.components[first] == [0.0] * len(rows)


def _pair(prompt: str) -> frozenset[int]:
    """The unordered operand pair of `37+08=`, read here rather than through the task code."""
    a, _, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    return frozenset((int(a), int(b)))


def _checked(rows: list[dict]) -> list[dict]:
    """`rows`, after checking each answer against the prompt worked out here."""
    for r in rows:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", r["prompt"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    return rows


SPLITS = [  # (n_train, n_eval, options): the GRPO demo's split uses all 10000 "+" problems
    (9500, 500, WORKED),
    (18000, 500, {}),  # `posttrain arithmetic`'s default
    (2000, 500, {"operators": "+"}),
    (600, 60, {"max_operand": 30}),  # the SFT and DPO integration tests'
]


@pytest.mark.parametrize(("n_train", "n_eval", "options"), SPLITS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_split_holds_out_unordered_operand_pairs(n_train, n_eval, options, seed):
    from posttrain.tasks.arithmetic import make_split

    train, held_out = make_split(n_train, n_eval, seed=seed, **options)
    assert (len(train), len(held_out)) == (n_train, n_eval)
    assert len({r["prompt"] for r in _checked(train + held_out)}) == n_train + n_eval
    assert len({r["id"] for r in train + held_out}) == n_train + n_eval
    train_pairs = {_pair(r["prompt"]) for r in train}
    assert not {_pair(r["prompt"]) for r in held_out} & train_pairs
    # spelled out: a held-out `a+b` never has its mirror `b+a` in training
    train_prompts = {r["prompt"] for r in train}
    for r in held_out:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", r["prompt"]).groups()
        assert f"{b}{op}{a}=" not in train_prompts or a == b
    assert make_split(n_train, n_eval, seed=seed, **options) == (train, held_out)
    assert make_split(n_train, n_eval, seed=seed + 3, **options)[1] != held_out


def test_make_split_uses_the_overflow_of_a_cut_pair_nowhere():
    from posttrain.tasks.arithmetic import make_split

    # with "+-" every pair has 2 or 4 problems, so 1 held-out problem cuts a pair in two
    train, held_out = make_split(19998, 1, operators="+-")
    (cut,) = {_pair(r["prompt"]) for r in held_out}
    assert len(train) == 19998 and cut not in {_pair(r["prompt"]) for r in train}
    everything = {
        f"{a:02d}{op}{b:02d}=" for a in range(100) for b in range(100) for op in "+-"
    }  # 20000 problems
    (unused,) = everything - {r["prompt"] for r in train + held_out}
    assert _pair(unused) == cut
    with pytest.raises(ValueError, match="leaves 19998 for training .*1 of a cut pair"):
        make_split(19999, 1, operators="+-")
    with pytest.raises(ValueError, match="only 20000 distinct problems"):
        make_split(19600, 401)


@pytest.mark.parametrize("options", [{}, WORKED, {"max_operand": 30}])
def test_arithmetic_task_train_and_eval_never_share_a_pair_whatever_the_seeds_and_sizes(options):
    task = TASKS["arithmetic"]
    eval_pairs: set[frozenset[int]] = set()
    sizes = [5, 100, 500, 5000] if "max_operand" not in options else [5, 100]
    for seed in (0, 1):
        for n_eval in sizes[:-1]:
            eval_pairs |= {
                _pair(r["prompt"]) for r in _checked(task.make("eval", n_eval, seed, **options))
            }
    for seed in (0, 1, 5):
        for n_train in sizes:
            train = _checked(task.make("train", n_train, seed, **options))
            assert not {_pair(r["prompt"]) for r in train} & eval_pairs
    # the largest splits: every problem, the pairs of the two never meet
    with pytest.raises(ValueError, match=r"the eval split has (\d+) problems") as error:
        task.make("eval", 10**6, 0, **options)
    n_eval = int(re.search(r"has (\d+) problems", str(error.value)).group(1))
    with pytest.raises(ValueError, match=r"the train split has (\d+) problems") as error:
        task.make("train", 10**6, 0, **options)
    n_train = int(re.search(r"has (\d+) problems", str(error.value)).group(1))
    top, operators = options.get("max_operand", 99) + 1, options.get("operators", "+-")
    assert n_train + n_eval == top * top * len(operators)  # every (a, op, b) in one of the two
    train, held_out = (
        task.make("train", n_train, 3, **options),
        task.make("eval", n_eval, 3, **options),
    )
    assert not {_pair(r["prompt"]) for r in train} & {_pair(r["prompt"]) for r in held_out}
    assert all(r["completion"].count(", ") == 2 for r in train) == bool(options.get("worked"))


def test_arithmetic_default_rewards_judge_the_final_answer_of_worked_sums():
    task = TASKS["arithmetic"]
    prompts = ["37+08="] * 5
    completions = ["45", "46", "7+8=15, 3+0+1=4, 45", "7+8=15, 3+0+1=4, 44", "7+8=15, 3+0+1=4"]
    scores = {}
    for label, options in (("bare", {}), ("worked", WORKED)):
        composite = build_composite(task.default_rewards(options))
        scores[label] = composite(prompts, completions, answer=["45"] * 5).scores
    assert scores["bare"] == [1.0, 0.0, 0.0, 0.0, 0.0]  # the answer alone, as the rows ask
    assert scores["worked"] == [1.0, 0.0, 1.0, 0.0, 0.0]  # the last comma-separated field


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
    assert task.default_rewards({})[0]["name"] == "ifeval"


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
    with pytest.raises(ValueError, match="operators='\\+'"):
        TASKS["arithmetic"].make("train", 10, 0, worked=True)
    with pytest.raises(ValueError, match="max_operand 120 > 99"):
        arithmetic.make_split(10, 10, operators="+", worked=True, max_operand=120)
    with pytest.raises(ValueError, match="operators: expected"):
        arithmetic.make_split(10, 10, operators="*")
    # the default data is unchanged by the new options: bare answers, both operators
    train, _ = arithmetic.make_split(500, 0)
    assert {r["prompt"][2] for r in train} == {"+", "-"}
    assert all(r["completion"] == r["answer"] for r in train)
