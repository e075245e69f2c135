"""CodeReward: the score is the fraction of tests really passed, and cheating scores nothing."""

from __future__ import annotations

import json

import pytest

from posttrain.rewards.base import check_output
from posttrain.rewards.code import CodeReward, extract_code, outputs_match
from posttrain.rewards.sandbox import sandbox_available

AVAILABLE, WHY = sandbox_available()
needs_sandbox = pytest.mark.skipif(not AVAILABLE, reason=f"sandbox unavailable here: {WHY}")

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
DOUBLE_IO = [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10"}]
reward = CodeReward(wall_s=5, cpu_s=3, test_timeout_s=1, memory_mb=256, max_processes=4)


def score(completions: list[str], tests: object) -> tuple[list[float], dict[str, list[float]]]:
    out = check_output(
        reward([""] * len(completions), completions, tests=[tests] * len(completions)),
        len(completions),
        "code",
    )
    return out.scores, out.components


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nHope it helps."


@needs_sandbox
def test_correct_partial_and_broken_solutions_in_one_batch():
    scores, parts = score(
        [
            fenced("def add(a, b):\n    return a + b"),
            fenced("def add(a, b):\n    return a + b if a > 0 else 7"),  # passes 2 of 3
            fenced("def add(a, b) return a + b"),  # syntax error
        ],
        ADD_TESTS,
    )
    assert scores == [1.0, 2 / 3, 0.0]
    assert parts["code/passed_fraction"] == scores
    assert parts["code/compiled"] == [1.0, 1.0, 0.0]
    assert parts["code/timed_out"] == [0.0, 0.0, 0.0]


@needs_sandbox
@pytest.mark.parametrize(
    "cheat",
    [
        # claims success on stdout, in the formats a harness might use
        "print('PASS\\nPASS\\nPASS\\nall tests passed')\nimport sys; sys.exit(0)",
        "print('\\n' + 'f' * 32 + ' 1 111')",
        # leaves before the tests run
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        # disables assertions or the machinery around them
        "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
        "builtins.BaseException = Exception\nbuiltins.exec = lambda *a, **k: None",
        "import os, signal\nos.write = lambda fd, data: len(data)\nsignal.setitimer = lambda *a: None",
        # reads stdin hoping to find the harness's secrets
        "import sys\ndata = sys.stdin.read()\nprint(data)",
    ],
)
def test_cheating_solutions_score_zero(cheat):
    wrong = "def add(a, b):\n    return -99\n"
    scores, parts = score([fenced(wrong + cheat)], ADD_TESTS)
    assert scores == [0.0]


@needs_sandbox
def test_a_test_that_hangs_fails_alone_and_is_flagged():
    code = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b"
    scores, parts = score([fenced(code)], ADD_TESTS)
    assert scores == [2 / 3]
    assert parts["code/timed_out"] == [1.0]


@needs_sandbox
def test_stdin_stdout_tests_in_every_layout():
    good = fenced("print(int(input()) * 2)")
    half = fenced("n = int(input())\nprint(6 if n == 3 else n)")
    apps_layout = {"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10\n"]}
    scores, parts = score([good, half, fenced("print(")], DOUBLE_IO)
    assert scores == [1.0, 0.5, 0.0]
    assert parts["code/compiled"] == [1.0, 1.0, 0.0]
    for tests in (apps_layout, json.dumps(DOUBLE_IO)):
        assert score([half], tests)[0] == [0.5]


@needs_sandbox
def test_stdout_test_counts_a_crash_after_the_right_output_as_failed():
    scores, _ = score([fenced("print(int(input()) * 2)\nraise SystemExit(1)")], DOUBLE_IO)
    assert scores == [0.0]


def test_extract_code_takes_the_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```\nnot python\n```\n```py\nx = 2\n```\nbye"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("x = 4") == "x = 4"


def test_outputs_match_ignores_only_trailing_whitespace():
    assert outputs_match("1 2  \n3\n\n", "1 2\n3")
    assert not outputs_match("1  2\n3", "1 2\n3")
    assert not outputs_match("1\n\n3", "1\n3")


def test_bad_tests_field_names_the_row():
    with pytest.raises(ValueError, match=r"row 1, field 'tests'.*non-empty list"):
        reward(["", ""], ["x", "y"], tests=[ADD_TESTS, []])
    with pytest.raises(ValueError, match="needs a 'tests' field"):
        reward([""], ["x"], answer=["1"])
