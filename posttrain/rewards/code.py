"""The code-execution reward: run the completion's program against the row's tests in a sandbox.

Score = fraction of the row's tests passed; a test that times out, crashes or cannot run fails.
The program is the last ```python fenced block of the completion (```py, ```python3 too), else
the last untagged fenced block, else the whole completion.

The field `tests` holds, per row, either
  - assert-style tests: a list of Python statements (`"assert add(1, 2) == 3"`), each one test;
  - stdin/stdout tests: a list of `{"input": str, "output": str}`, or the APPS layout
    `{"inputs": [...], "outputs": [...]}`;
or that value JSON-encoded as a string.

Assert tests run in one sandbox per completion under a harness that reads the code, the tests
and a random nonce from stdin before the code runs, then reports `<nonce> <compiled> <bits>` on a
copy of stdout after the tests. Printing fake results, `sys.exit(0)` or `os._exit(0)` before the
tests, replacing builtins or exceptions: none of these produce the nonce, so none fake a pass.
What it cannot stop (docs/sandbox.md): code that digs the nonce out of the harness's frame
(`sys._getframe(1).f_locals`) or returns an object whose `__eq__` is always True.

Stdin/stdout tests run one sandbox each: pass iff the program exits 0 within the limits and its
stdout equals the expected output up to trailing whitespace on each line and trailing blank
lines. One more run per completion, the harness with no tests, says whether the code compiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.sandbox import SandboxLimits, SandboxResult, run_python

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = {"python", "py", "python3"}

# Runs inside the sandbox. Everything it needs after the code has run is bound to a local first,
# so monkeypatching os, signal or builtins from the code changes nothing here.
HARNESS = r"""
import json, os, signal, sys


class _TestTimeout(BaseException):
    pass


def _harness():
    spec = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)  # the code reads an empty stdin
    nonce, code, tests = spec["nonce"], spec["code"], spec["tests"]
    timeout = spec["test_timeout_s"]
    write, exit_now, report_fd = os.write, os._exit, os.dup(1)
    run, compile_, setitimer, set_handler = exec, compile, signal.setitimer, signal.signal
    real_timer, alarm = signal.ITIMER_REAL, signal.SIGALRM
    any_error, timed_out = BaseException, _TestTimeout

    def on_alarm(signum, frame):
        raise timed_out

    def attempt(source, filename, namespace):
        # "1" passed, "0" failed, "t" ran out of time
        set_handler(alarm, on_alarm)
        setitimer(real_timer, timeout)
        try:
            run(compile_(source, filename, "exec"), namespace)
            return "1"
        except timed_out:
            return "t"
        except any_error:
            return "0"
        finally:
            setitimer(real_timer, 0)

    try:
        compile_(code, "solution.py", "exec")
    except any_error:
        write(report_fd, ("\n%s 0 %s\n" % (nonce, "0" * len(tests))).encode())
        exit_now(0)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if tests:
        attempt(code, "solution.py", namespace)
    bits = "".join([attempt(test, "test.py", namespace) for test in tests])
    write(report_fd, ("\n%s 1 %s\n" % (nonce, bits)).encode())
    exit_now(0)


_harness()
"""


def extract_code(completion: str) -> str:
    """The last ```python block, else the last untagged fenced block, else the whole text."""
    blocks = FENCE.findall(completion)
    for wanted in (PYTHON_TAGS, {""}):
        tagged = [body for tag, body in blocks if tag.lower() in wanted]
        if tagged:
            return tagged[-1]
    return completion


@dataclass(frozen=True)
class AssertTests:
    statements: list[str]


@dataclass(frozen=True)
class IOTests:
    cases: list[tuple[str, str]]


def parse_tests(value: Any, row: int) -> AssertTests | IOTests:
    """Validate one row's `tests` field; errors name the row and say what was expected."""
    where = f"CodeReward: row {row}, field 'tests'"
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        if isinstance(value, str):
            value = [value]  # one block of assert statements
    if isinstance(value, dict) and {"inputs", "outputs"} <= value.keys():
        if len(value["inputs"]) != len(value["outputs"]):
            raise ValueError(
                f"{where}: {len(value['inputs'])} inputs but {len(value['outputs'])} outputs"
            )
        value = [
            {"input": i, "output": o}
            for i, o in zip(value["inputs"], value["outputs"], strict=True)
        ]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"{where}: expected a non-empty list of assert statements or of "
            f'{{"input", "output"}} objects, got {type(value).__name__} {str(value)[:80]!r}'
        )
    if all(isinstance(t, str) for t in value):
        return AssertTests(list(value))
    if all(isinstance(t, dict) and {"input", "output"} <= t.keys() for t in value):
        return IOTests([(_as_text(t["input"]), _as_text(t["output"])) for t in value])
    raise ValueError(
        f"{where}: mixes types or has an entry that is neither an assert statement nor an "
        f'{{"input", "output"}} object: {str(value)[:120]!r}'
    )


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else "\n".join(map(str, value))


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""

    def norm(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(actual) == norm(expected)


@dataclass
class CodeReward:
    """Fraction of the row's tests the completion's program passes, run in the sandbox.

    Components: `code/passed_fraction` (the score), `code/compiled` (1.0 when the program
    parses), `code/timed_out` (1.0 when any of its runs or tests ran out of time).
    """

    name: ClassVar[str] = "code"
    wall_s: float = 10.0
    """Wall-clock limit of one sandbox run (all assert tests of a completion share one run)."""
    cpu_s: float = 5.0
    """CPU-second limit of one sandbox run."""
    test_timeout_s: float = 3.0
    """Per assert test, and for the code's top level, inside the run."""
    memory_mb: int = 512
    """Address-space limit per process."""
    max_output_bytes: int = 1 << 20
    """Cap on each run's stdout and stderr."""
    max_processes: int = 8
    """Processes plus threads a run may have."""
    max_workers: int | None = None
    """Sandboxes run at once; None means one per CPU core."""

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        if "tests" not in fields:
            raise ValueError(
                f"CodeReward needs a 'tests' field per row; got fields {sorted(fields)}"
            )
        tests = fields["tests"]
        if len(tests) != len(completions):
            raise ValueError(
                f"CodeReward: {len(tests)} rows of 'tests' for {len(completions)} completions"
            )
        parsed = [parse_tests(t, row) for row, t in enumerate(tests)]
        codes = [extract_code(c) for c in completions]
        limits = SandboxLimits(
            wall_s=self.wall_s,
            cpu_s=self.cpu_s,
            memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes,
            max_processes=self.max_processes,
        )
        # One job per sandbox run: (row, None) is the harness run, (row, k) stdin/stdout case k.
        jobs: list[tuple[int, int | None]] = []
        for row, spec in enumerate(parsed):
            jobs.append((row, None))
            if isinstance(spec, IOTests):
                jobs.extend((row, k) for k in range(len(spec.cases)))

        def run(job: tuple[int, int | None]) -> tuple[bool | None, list[bool], bool]:
            """(compiled or None, per-test pass, any time-out) for one job."""
            row, case = job
            spec = parsed[row]
            if case is None:
                statements = spec.statements if isinstance(spec, AssertTests) else []
                return self._run_harness(codes[row], statements, limits)
            stdin, expected = spec.cases[case]
            result = run_python(codes[row], stdin=stdin, limits=limits)
            passed = result.ok and outputs_match(result.stdout, expected)
            return None, [passed], result.timed_out

        workers = self.max_workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            outcomes = list(pool.map(run, jobs))

        passed: list[list[bool]] = [[] for _ in completions]
        compiled = [0.0] * len(completions)
        timed_out = [0.0] * len(completions)
        for (row, _), (ok_compile, results, timeout) in zip(jobs, outcomes, strict=True):
            if ok_compile is not None:
                compiled[row] = float(ok_compile)
            passed[row].extend(results)
            timed_out[row] = max(timed_out[row], float(timeout))
        scores = []
        for row, spec in enumerate(parsed):
            n_tests = len(spec.statements if isinstance(spec, AssertTests) else spec.cases)
            scores.append(sum(passed[row]) / n_tests if compiled[row] else 0.0)
        return RewardOutput(
            scores=scores,
            components={
                "code/passed_fraction": scores,
                "code/compiled": compiled,
                "code/timed_out": timed_out,
            },
        )

    def _run_harness(
        self, code: str, statements: list[str], limits: SandboxLimits
    ) -> tuple[bool, list[bool], bool]:
        nonce = secrets.token_hex(16)
        spec = {
            "nonce": nonce,
            "code": code,
            "tests": statements,
            "test_timeout_s": self.test_timeout_s,
        }
        result = run_python(HARNESS, stdin=json.dumps(spec), limits=limits)
        report = _find_report(result, nonce, len(statements))
        if report is None:  # killed, crashed or exited before the harness could report
            return True, [False] * len(statements), result.timed_out
        compiled, bits = report
        return compiled, [b == "1" for b in bits], result.timed_out or "t" in bits


def _find_report(result: SandboxResult, nonce: str, n_tests: int) -> tuple[bool, str] | None:
    for line in reversed(result.stdout.splitlines()):
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == nonce and len(parts[2]) == n_tests:
            return parts[1] == "1", parts[2]
    return None
