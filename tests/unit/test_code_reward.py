"""CodeReward: the score is the fraction of tests really passed, and cheating scores nothing.

A machine that cannot build the sandbox fails the tests that need it; set
POSTTRAIN_ALLOW_NO_SANDBOX=1 to skip them instead where that is known and accepted.
"""

from __future__ import annotations

import json
import os

import pytest

from posttrain.rewards.base import check_output
from posttrain.rewards.code import (
    CodeReward,
    decode_value,
    extract_code,
    harness_input,
    judge,
    outputs_match,
    parse_tests,
)
from posttrain.sandbox import sandbox_available


@pytest.fixture
def sandbox() -> None:
    """Fail (CI machines build the sandbox); skip only under POSTTRAIN_ALLOW_NO_SANDBOX=1."""
    available, why = sandbox_available()
    if available:
        return
    if os.environ.get("POSTTRAIN_ALLOW_NO_SANDBOX") == "1":
        pytest.skip(f"sandbox unavailable (POSTTRAIN_ALLOW_NO_SANDBOX=1): {why}")
    pytest.fail(f"sandbox unavailable: {why}\n(set POSTTRAIN_ALLOW_NO_SANDBOX=1 to skip instead)")


needs_sandbox = pytest.mark.usefixtures("sandbox")

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


def score_rows(rows: list[tuple[str, list[str]]]) -> tuple[list[float], dict[str, list[float]]]:
    completions = [fenced(code) for code, _ in rows]
    out = reward([""] * len(rows), completions, tests=[tests for _, tests in rows])
    out = check_output(out, len(rows), "code")
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


# Walks up to the harness's frame, finds its result channel and writes a complete, well-formed
# record for every test claiming each probe returned CLAIM, then leaves before the harness writes.
FORGE_CHANNEL = """
import json, os, sys
frame = sys._getframe()
while frame:
    seen = frame.f_locals
    if "channel" in seen and "tests" in seen:
        records = [{"probes": [{"value": CLAIM}] * len(probes)} for _, probes in seen["tests"]]
        os.write(seen["channel"], "".join(json.dumps(r) + "\\n" for r in records).encode())
        os._exit(0)
    frame = frame.f_back
"""
CHEATS = {
    # claims success on stdout, in the formats a harness might use
    "prints-pass": "print('PASS\\nPASS\\nPASS\\nall tests passed')\nimport sys; sys.exit(0)",
    "prints-marker": "print('\\n' + 'f' * 32 + ' 1 111')",
    # leaves before the tests run
    "sys-exit": "import sys\nsys.exit(0)",
    "os-exit": "import os\nos._exit(0)",
    # disables assertions or the machinery around them
    "patches-builtins": "import builtins\n"
    "builtins.AssertionError = type('Nope', (Exception,), {})\n"
    "builtins.BaseException = Exception\nbuiltins.exec = lambda *a, **k: None",
    "patches-os": "import os, signal\nos.write = lambda fd, data: len(data)\n"
    "signal.setitimer = lambda *a: None",
    # reads stdin hoping to find the harness's secrets
    "reads-stdin": "import sys\ndata = sys.stdin.read()\nprint(data)",
    # returns objects that claim to equal anything
    "eq-always-true": "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Yes()",
    "int-eq-always-true": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Yes(-99)",
    # walks up to the harness's frame, or searches the heap, for the nonce of a result marker
    "frames-forge-marker": "import os, sys\nframe = sys._getframe()\nwhile frame:\n"
    "    seen = frame.f_locals\n    if 'nonce' in seen and 'tests' in seen:\n"
    "        line = '\\n%s 1 %s\\n' % (seen['nonce'], '1' * len(seen['tests']))\n"
    "        os.write(seen['report_fd'], line.encode())\n        os._exit(0)\n"
    "    frame = frame.f_back",
    "gc-forge-marker": "import gc, os\nfor found in gc.get_objects():\n"
    "    if type(found) is dict and 'nonce' in found and 'tests' in found:\n"
    "        print('\\n%s 1 %s' % (found['nonce'], '1' * len(found['tests'])), flush=True)\n"
    "        os._exit(0)",
    # forges the values themselves, claiming the one that passes a truthiness check
    "frames-forge-channel": FORGE_CHANNEL.replace("CLAIM", "True"),
}


@needs_sandbox
@pytest.mark.parametrize("cheat", list(CHEATS.values()), ids=list(CHEATS))
def test_cheating_solutions_score_zero(cheat):
    wrong = "def add(a, b):\n    return -99\n"
    scores, parts = score([fenced(wrong + cheat)], ADD_TESTS)
    assert scores == [0.0]


def test_no_expected_value_enters_the_sandbox():
    """The harness gets the code, the imports and the probes; `== 1337` stays in the trainer."""
    tests = parse_tests(["assert add(1000, 336) == 1337", "assert 4242 != add(1, 2)"], 0)
    sent = harness_input("def add(a, b):\n    return a + b", tests.tests, 1.0)
    assert json.loads(sent)["tests"] == [
        [[], [["add(1000, 336)", False]]],
        [[], [["add(1, 2)", False]]],
    ]
    assert "1337" not in sent and "4242" not in sent


def test_judge_accepts_only_data_in_the_harness_encoding():
    (test,) = parse_tests(["assert f(1) == (1, {2}) and f(2) is None"], 0).tests
    good = {"t": "tuple", "v": [1, {"t": "set", "v": [2]}]}
    assert judge(test, {"probes": [{"value": good}, {"value": None}]})
    assert not judge(test, {"probes": [{"value": [1, [2]]}, {"value": None}]})  # list != tuple
    assert not judge(test, {"probes": [{"value": good}, {"raised": True}]})
    assert not judge(test, {"probes": [{"value": good}]})  # one probe missing
    assert not judge(test, {"timeout": True})
    with pytest.raises(ValueError, match="not a value the harness encodes"):
        decode_value({"t": "object", "v": "__import__('os')"})
    assert decode_value(
        {"t": "dict", "v": [[{"t": "tuple", "v": [1]}, {"t": "bytes", "v": "ff"}]]}
    ) == {(1,): b"\xff"}


def test_judge_refuses_to_build_huge_values_from_the_codes_data():
    """`*` and `**` on values the code chose could stall the trainer: those tests fail fast."""
    repeat, power, flatten = parse_tests(
        ["assert 'a' * f() != ''", "assert 2 ** f() > 0", "assert sum(f(), []) == []"], 0
    ).tests
    huge = {"probes": [{"value": 10**8}]}  # 100 MB built here, if it were allowed
    assert not judge(repeat, huge) and not judge(power, huge)
    assert judge(repeat, {"probes": [{"value": 3}]}) and judge(power, {"probes": [{"value": 3}]})
    assert flatten.probes == [("sum(f(), [])", False)]  # quadratic: left to the sandbox


def test_only_assert_statements_can_be_judged():
    check = "def check(candidate):\n    assert candidate(1) == 2\ncheck(f)"
    with pytest.raises(ValueError, match=r"row 3, field 'tests', test 1: only `assert` statements"):
        parse_tests(["assert f(1) == 2", check], 3)
    with pytest.raises(ValueError, match=r"row 0, field 'tests', test 0: not valid Python"):
        parse_tests(["assert f(1) =="], 0)


@needs_sandbox
def test_values_are_judged_outside_as_python_would():
    """Honest solutions returning each kind of plain data score as under plain asserts."""
    rows = [
        (
            "def f(n):\n    return (x * x for x in range(n))",  # a generator, consumed by list/sum
            ["assert list(f(3)) == [0, 1, 4]", "assert sum(f(3)) == 5", "assert max(f(3)) == 4"],
        ),
        (
            # a float subclass, as numpy.float64 is: judged by its float value
            "class Real(float):\n    pass\ndef f(x):\n    return Real(x / 3)",
            [
                "import math\nassert math.isclose(f(1), 0.3333, rel_tol=1e-3)",
                "assert abs(f(1) - 1 / 3) < 1e-9",
                "assert round(f(1), 2) == 0.33",
            ],
        ),
        (
            "def f(s):\n    return {c: s.count(c) for c in s}, (s, None), {s}, s.encode()",
            [
                "assert f('aab')[0] == {'a': 2, 'b': 1}",
                "assert f('a')[1:] == (('a', None), {'a'}, b'a')",
                "assert f('a')[1] != ['a', None]",  # a tuple is not a list
            ],
        ),
        (
            "def is_even(n):\n    return n % 2 == 0\ndef boom():\n    raise ValueError",
            [
                "assert is_even(2)\nassert not is_even(3)",
                "assert is_even(4) is True and 1 < len([is_even(1)] * 2) <= 2",
                "assert is_even(2) or boom()",  # short-circuits: boom() is never needed
                "assert boom() == 1",
            ],
        ),
    ]
    scores, parts = score_rows(rows)
    assert scores == [1.0, 1.0, 1.0, 0.75]
    assert parts["code/compiled"] == [1.0] * 4


@needs_sandbox
def test_a_forged_channel_is_worth_what_returning_the_value_is():
    """The channel cannot be kept from code in the same process; it carries only values, and
    the expected ones are not in the sandbox. Forging `add(...) -> 3` for every probe scores
    what `return 3` scores: the one test whose answer is 3."""
    wrong = "def add(a, b):\n    return -99\n"
    forged = fenced(wrong + FORGE_CHANNEL.replace("CLAIM", "3"))
    constant = fenced("def add(a, b):\n    return 3")
    scores, _ = score([forged, constant], ADD_TESTS)
    assert scores == [1 / 3, 1 / 3]


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
