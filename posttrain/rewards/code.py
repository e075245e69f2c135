"""The code-execution reward: run the completion's program against the row's tests in a sandbox.

Score = fraction of the row's tests passed; a test that times out, crashes or cannot run fails.
The program is the last ```python fenced block of the completion (```py, ```python3 too), else
the last untagged fenced block, else the whole completion.

The field `tests` holds, per row, either
  - assert-style tests: a list of strings, each one test made of `assert` statements and the
    imports they need (`"assert add(1, 2) == 3"`); a single string is one such test;
  - stdin/stdout tests: a list of `{"input": str, "output": str}`, or the APPS layout
    `{"inputs": [...], "outputs": [...]}`;
or that value JSON-encoded as a string.

Assert tests are judged here, never in the code's process (design and limits: docs/sandbox.md).
Each assert's condition is split when the tests are loaded: comparisons, `and`/`or`/`not`,
arithmetic, subscripts, literals and the pure built-ins in JUDGED_CALLS stay in the trainer;
every other subexpression (`add(1, 2)`) is a probe. One sandbox run per completion executes the
code, evaluates the probes in its namespace and writes their values as plain data (JSON, with
tags for tuples, sets, dicts, bytes and complex) on a channel the harness opened before the code
ran. The trainer decodes them with `json.loads` (never eval) and evaluates the conditions on
them. Expected values never enter the sandbox and only data comes out, so an `__eq__` that is
always True does not survive the trip, and a forged result is only an answer it could have
returned anyway. Other statements (a HumanEval `def check(candidate)`) cannot be judged this way
and are rejected when the tests are loaded.

Stdin/stdout tests run one sandbox each: pass iff the program exits 0 within the limits and its
stdout equals the expected output up to trailing whitespace on each line and trailing blank
lines. One more run per completion, the harness with no tests, says whether the code compiles.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from posttrain.rewards.base import RewardOutput
from posttrain.sandbox import SandboxLimits, run_python

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = {"python", "py", "python3"}

JUDGED_CALLS: dict[str, Callable[..., Any]] = {
    "abs": abs, "all": all, "any": any, "bool": bool, "dict": dict, "float": float,
    "frozenset": frozenset, "int": int, "len": len, "list": list, "max": max, "min": min,
    "round": round, "set": set, "sorted": sorted, "str": str, "sum": sum, "tuple": tuple,
    "isclose": math.isclose, "math.isclose": math.isclose,
}  # fmt: skip
"""Functions a test may apply to the code's values that the trainer evaluates itself, on the
decoded values, with its own built-ins (a name the code redefines does not change them)."""
ITERATING_CALLS = {"all", "any", "frozenset", "list", "max", "min", "set", "sorted", "sum", "tuple"}
"""Those whose first argument is iterated: a probe there comes back as `list(value)`, so
`list(gen(3))` works for a generator. Iterating inside is safe: the items still have to be data."""
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
UNARY = {
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}
COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
JUDGED_NODES = (
    ast.Constant,
    ast.Tuple,
    ast.List,
    ast.Set,
    ast.Dict,
    ast.Subscript,
    ast.Slice,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
)
"""Node types the trainer evaluates (and ast.BinOp with an operator in BINARY, and calls of
JUDGED_CALLS); any other subexpression of a condition is a probe."""
MAX_RESULT_ITEMS = 10**7
"""Largest sequence (or integer, in bits) `*` and `**` may build from the code's values here."""

# Runs inside the sandbox as main.py, input on stdin. Whatever the code does to this process, all
# it can put on the channel is values: the harness never sees an expected value or a verdict.
HARNESS = r"""
import json, os, signal, sys


class _TestTimeout(BaseException):
    pass


def _harness():
    spec = json.loads(sys.stdin.buffer.read())
    devnull = os.open("/dev/null", os.O_RDWR)
    channel = os.dup(1)  # the results; the code's stdin and stdout are /dev/null
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    code, tests, timeout = spec["code"], spec["tests"], spec["test_timeout_s"]
    write, exit_now, dumps = os.write, os._exit, json.dumps
    run, evaluate, compile_, kind_of, as_list = exec, eval, compile, type, list
    setitimer, set_handler = signal.setitimer, signal.signal
    real_timer, alarm = signal.ITIMER_REAL, signal.SIGALRM
    any_error, timed_out, is_a = BaseException, _TestTimeout, isinstance
    sequences = (tuple, set, frozenset)
    base_values = ((int, int.__int__), (float, float.__float__), (str, str.__str__))

    def send(record):
        write(channel, (dumps(record) + "\n").encode())

    def encode(value, depth=0):
        # Exact built-in types only: a subclass or any other object could answer comparisons.
        kind = kind_of(value)
        if depth > 100:
            raise ValueError("nested too deep")
        if kind in (int, float, str, type(None), bool):
            return value
        if kind is complex:
            return {"t": "complex", "v": [value.real, value.imag]}
        if kind is list:
            return [encode(item, depth + 1) for item in value]
        if kind in sequences:
            return {"t": kind.__name__, "v": [encode(item, depth + 1) for item in value]}
        if kind is dict:
            pairs = [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]
            return {"t": "dict", "v": pairs}
        if kind in (bytes, bytearray):
            return {"t": "bytes", "v": value.hex()}
        for base, base_value in base_values:  # numpy.float64 & co.: by the base type's value
            if is_a(value, base):
                return base_value(value)
        raise TypeError("not plain data: %s" % kind.__name__)

    def on_alarm(signum, frame):
        raise timed_out

    def timed(action):
        set_handler(alarm, on_alarm)
        setitimer(real_timer, timeout)
        try:
            return action()
        finally:
            setitimer(real_timer, 0)

    def probe_all(imports, probes):
        for statement in imports:
            run(compile_(statement, "test.py", "exec"), namespace)
        results = []
        for source, iterate in probes:
            try:
                value = evaluate(compile_(source, "test.py", "eval"), namespace)
                results.append({"value": encode(as_list(value) if iterate else value)})
            except timed_out:
                raise
            except any_error:
                results.append({"raised": True})
        return results

    try:
        solution = compile_(code, "solution.py", "exec")
    except any_error:
        send({"compiled": False})
        exit_now(0)
    send({"compiled": True})
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if tests:
        try:
            timed(lambda: run(solution, namespace))
        except any_error:
            pass  # the tests decide: what the code defined before failing still counts
    for imports, probes in tests:
        try:
            send({"probes": timed(lambda: probe_all(imports, probes))})
        except timed_out:
            send({"timeout": True})
        except any_error:
            send({"failed": True})
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
class AssertTest:
    """One assert-style test: `imports` and `probes` run in the sandbox, `conditions` here."""

    source: str
    imports: list[str]
    probes: list[tuple[str, bool]]
    """(expression source, iterate): the subexpressions evaluated in the code's namespace."""
    conditions: list[ast.expr]
    """Each assert's condition, its probes replaced by `Name("probe:<k>")`."""


@dataclass(frozen=True)
class AssertTests:
    tests: list[AssertTest]


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
        return AssertTests(
            [_parse_assert_test(t, f"{where}, test {k}") for k, t in enumerate(value)]
        )
    if all(isinstance(t, dict) and {"input", "output"} <= t.keys() for t in value):
        return IOTests([(_as_text(t["input"]), _as_text(t["output"])) for t in value])
    raise ValueError(
        f"{where}: mixes types or has an entry that is neither an assert statement nor an "
        f'{{"input", "output"}} object: {str(value)[:120]!r}'
    )


def _parse_assert_test(source: str, where: str) -> AssertTest:
    try:
        module = ast.parse(source)
    except SyntaxError as e:
        message = f"{where}: not valid Python ({e.msg}, line {e.lineno}): {source[:80]!r}"
        raise ValueError(message) from None
    imports, probes, conditions = [], [], []
    for statement in module.body:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            imports.append(ast.unparse(statement))
        elif isinstance(statement, ast.Assert):
            conditions.append(_split(statement.test, probes))
        else:
            raise ValueError(
                f"{where}: only `assert` statements and imports can be judged outside the "
                f"sandbox, got {type(statement).__name__} `{ast.unparse(statement)[:60]}`; "
                "write each check as `assert <expression> == <expected>` (docs/sandbox.md)"
            )
    if not conditions:
        raise ValueError(f"{where}: no assert statement in {source[:80]!r}")
    return AssertTest(source, imports, probes, conditions)


def _split(node: ast.expr, probes: list[tuple[str, bool]], iterate: bool = False) -> ast.expr:
    """`node` with each subexpression the trainer does not evaluate itself made a probe.

    The trainer keeps the judgement (comparisons, boolean operators) and every operator that
    could mix the code's values with expected ones (arithmetic, subscripts, JUDGED_CALLS), so
    no expected value ever reaches the code's objects. A probe is a maximal subtree of the rest:
    a call of the code's functions, a name, an attribute.
    """
    children = list(ast.iter_child_nodes(node))
    unpacks = any(isinstance(c, ast.Starred) for c in children)
    if isinstance(node, ast.Call) and not unpacks and _dotted(node.func) in JUDGED_CALLS:
        name = _dotted(node.func)
        constant_keywords = all(
            k.arg is not None and isinstance(k.value, ast.Constant) for k in node.keywords
        )
        # `sum(lists, [])` is quadratic in the code's data: it runs inside, as a probe
        if constant_keywords and not (name == "sum" and len(node.args) > 1):
            # min(a, b) and max(a, b) compare their arguments; with one, they iterate it
            first_iterates = name in ITERATING_CALLS and (
                name not in {"min", "max"} or len(node.args) == 1
            )
            node.args = [
                _split(arg, probes, iterate=first_iterates and k == 0)
                for k, arg in enumerate(node.args)
            ]
            return node
    spreads = unpacks or (isinstance(node, ast.Dict) and None in node.keys)  # *a, {**d}
    judged = isinstance(node, JUDGED_NODES)
    judged |= isinstance(node, ast.BinOp) and type(node.op) in BINARY
    if judged and not spreads:
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                setattr(node, field, _split(value, probes))
            elif isinstance(value, list):
                items = [_split(v, probes) if isinstance(v, ast.expr) else v for v in value]
                setattr(node, field, items)
        return node
    probes.append((ast.unparse(node), iterate))
    return ast.Name(id=f"probe:{len(probes) - 1}", ctx=ast.Load())


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


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


def decode_value(data: Any) -> Any:
    """A value the harness sent, from its JSON: plain data, tagged objects for other literals.

    Only the harness's encoding is accepted; anything else raises ValueError.
    """
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode_value(item) for item in data]
    if kind is dict and data.keys() == {"t", "v"} and type(data["v"]) in (list, str):
        tag, payload = data["t"], data["v"]
        if tag in ("tuple", "set", "frozenset") and type(payload) is list:
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                decode_value(item) for item in payload
            )
        if tag == "dict" and type(payload) is list and all(len(p) == 2 for p in payload):
            return {decode_value(k): decode_value(v) for k, v in payload}
        if tag == "bytes" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag == "complex" and [type(p) for p in payload] in ([float, float], [int, int]):
            return complex(*payload)
    raise ValueError(f"not a value the harness encodes: {str(data)[:80]!r}")


class _ProbeRaised(Exception):
    """The probe raised in the sandbox: the condition fails if it needs that value."""


def _evaluate(node: ast.expr, values: list[Any]) -> Any:
    """A condition from `_split`, evaluated on the probes' decoded values (plain data only)."""

    def ev(child: ast.expr) -> Any:
        return _evaluate(child, values)

    match node:
        case ast.Name(id=name):
            value = values[int(name.removeprefix("probe:"))]
            if value is _ProbeRaised:
                raise _ProbeRaised(name)
            return value
        case ast.Constant(value=value):
            return value
        case ast.Tuple(elts=items):
            return tuple(ev(item) for item in items)
        case ast.List(elts=items):
            return [ev(item) for item in items]
        case ast.Set(elts=items):
            return {ev(item) for item in items}
        case ast.Dict(keys=keys, values=items):
            return {ev(k): ev(v) for k, v in zip(keys, items, strict=True)}
        case ast.UnaryOp(op=op, operand=operand):
            return UNARY[type(op)](ev(operand))
        case ast.BinOp(left=left, op=op, right=right):
            return _binary(op, ev(left), ev(right))
        case ast.BoolOp(op=op, values=operands):
            result = None
            for operand in operands:  # short-circuits like Python: returns the deciding value
                result = ev(operand)
                if bool(result) == isinstance(op, ast.Or):
                    return result
            return result
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            current = ev(left)
            for op, comparator in zip(ops, comparators, strict=True):
                following = ev(comparator)
                if not COMPARE[type(op)](current, following):
                    return False
                current = following
            return True
        case ast.Subscript(value=value, slice=index):
            return ev(value)[ev(index)]
        case ast.Slice(lower=lower, upper=upper, step=step):
            return slice(*(None if part is None else ev(part) for part in (lower, upper, step)))
        case ast.Call(func=func, args=args, keywords=keywords):
            kwargs = {k.arg: ev(k.value) for k in keywords}
            return JUDGED_CALLS[_dotted(func)](*[ev(arg) for arg in args], **kwargs)
    raise AssertionError(f"_split left an unexpected node: {ast.dump(node)[:200]}")


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    """`left op right`, refusing results the code could make huge to stall the trainer."""
    if isinstance(op, ast.Mult):
        for seq, times in ((left, right), (right, left)):
            repeats = isinstance(seq, str | bytes | list | tuple) and isinstance(times, int)
            if repeats and len(seq) * times > MAX_RESULT_ITEMS:
                raise ValueError(f"{len(seq)} items * {times} is too large to build")
    integers = isinstance(left, int) and isinstance(right, int)
    if isinstance(op, ast.Pow) and integers and left.bit_length() * right > MAX_RESULT_ITEMS:
        raise ValueError(f"an integer ** {right} is too large to build")
    if isinstance(op, ast.Mod) and isinstance(left, str | bytes):
        raise ValueError("%-formatting is not evaluated here")  # `"%*d" % (10**9, 1)`
    return BINARY[type(op)](left, right)


def judge(test: AssertTest, record: Any) -> bool:
    """Whether `test` passed, from the harness's record of its probes' values."""
    if type(record) is not dict or record.keys() != {"probes"}:
        return False  # the test timed out or its imports failed
    results = record["probes"]
    if type(results) is not list or len(results) != len(test.probes):
        return False
    try:
        values = [
            decode_value(r["value"]) if type(r) is dict and r.keys() == {"value"} else _ProbeRaised
            for r in results
        ]
        return all(bool(_evaluate(condition, values)) for condition in test.conditions)
    except Exception:  # a probe that raised, a type error, a value too deep or too large: failed
        return False


def harness_input(code: str, tests: Sequence[AssertTest], test_timeout_s: float) -> str:
    """The harness's stdin: the code and, per test, its imports and probes. No expected value."""
    spec = {
        "code": code,
        "tests": [[t.imports, t.probes] for t in tests],
        "test_timeout_s": test_timeout_s,
    }
    return json.dumps(spec)


def _read_records(stdout: str) -> list[Any]:
    """The harness's JSON lines, up to the first that is not one (a killed run stops early)."""
    records = []
    for line in stdout.split("\n"):
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            break
    return records


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
    """Cap on each run's stdout and stderr (for assert tests, stdout carries the values)."""
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
                assert_tests = spec.tests if isinstance(spec, AssertTests) else []
                return self._run_harness(codes[row], assert_tests, limits)
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
            n_tests = len(spec.tests if isinstance(spec, AssertTests) else spec.cases)
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
        self, code: str, tests: list[AssertTest], limits: SandboxLimits
    ) -> tuple[bool, list[bool], bool]:
        stdin = harness_input(code, tests, self.test_timeout_s)
        result = run_python(HARNESS, stdin=stdin, limits=limits)
        # Line 1 says whether the code compiled, then one record per test, in order. A run killed
        # before line 1 counts as compiled (the code got that far), with every test failed.
        header, *records = _read_records(result.stdout) or [{"compiled": True}]
        compiled = type(header) is dict and header.get("compiled") is not False
        records += [None] * (len(tests) - len(records))
        passed = [judge(test, record) for test, record in zip(tests, records, strict=False)]
        timeout = any(type(r) is dict and r.get("timeout") is True for r in records)
        return compiled, passed, result.timed_out or timeout
