"""Tools and the tool environment: real calls, real worker processes, the real sandbox.

User tools come from a module written to a temporary directory and put on sys.path, so that the
worker processes import it exactly as they would a user's package. The sandboxed python tool
follows tests/unit/test_sandbox.py: a machine that cannot build the sandbox fails these tests
unless POSTTRAIN_ALLOW_NO_SANDBOX=1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain.sandbox import sandbox_available
from posttrain.tools import (
    Observation,
    ToolEnvironment,
    build_tools,
    parse_tool_calls,
)
from posttrain.tools.calculator import calculator


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def response(text: str) -> str:
    return f"<tool_response>\n{text}\n</tool_response>"


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a killed one waiting for init to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


# ---------------------------------------------------------------------------------------------
# calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("347*829", "287663"),
        # (10**20 - 1)**2 = 10**40 - 2 * 10**20 + 1
        ("99999999999999999999 * 99999999999999999999", "9999999999999999999800000000000000000001"),
        ("123456789 * 987654321", "121932631112635269"),
        ("2**100", "1267650600228229401496703205376"),
        ("(1 + 2) * 3 - 4 / 2", "7.0"),  # / is true division
        ("-7 // 2", "-4"),
        ("-7 % 3", "2"),
        ("10 / 4", "2.5"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("2 ** -1", "0.5"),
        ("-3 ** 2", "-9"),  # ** binds tighter than unary minus, as in Python
        ("+(2.5e3)", "2500.0"),
        ("10**999 - 1", "9" * 999),
    ],
)
def test_calculator_computes_exactly(expression, expected):
    result = calculator()({"expression": expression}, max_output_chars=2000)
    assert (result.text, result.failed) == (expected, False)


def test_calculator_output_is_cut_like_any_other():
    result = calculator()({"expression": "10**999"}, max_output_chars=100)
    marker = "\n... [output cut: 1000 chars in all]"
    assert (result.text, result.failed) == ("1" + "0" * (99 - len(marker)) + marker, True)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('touch /tmp/pwned')", "function calls are not allowed"),
        ("().__class__.__bases__[0].__subclasses__()", "function calls are not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "unsupported literal 'a'"),
        ("True + 1", "unsupported literal True"),
        ("[1, 2]", "unsupported expression (List)"),
        ("1 if 2 else 3", "unsupported expression (IfExp)"),
        ("2 ^ 10", "write powers as a ** b"),
        ("1 << 100000", "unsupported operator LShift"),
        ("9**9**9", "result too large: more than 1000 digits"),
        ("10**1000", "result too large: more than 1000 digits"),  # 1001 digits
        ("10**999 * 10**999", "result too large: more than 1000 digits"),
        ("2.0 ** 100000", "result too large for a float"),
        ("10**500 / 3", "result too large for a float"),
        ("1e308 * 10", "result is not a finite number"),
        ("(-8) ** (1/3)", "result is a complex number"),
        ("7 / 0", "division by zero"),
        ("7 % 0.0", "division by zero"),
        ("3 +", "invalid expression"),
        ("1" + "+1" * 1500, "expression too long"),
    ],
)
def test_calculator_refuses_with_an_error_not_a_crash(expression, message):
    start = time.perf_counter()
    result = calculator()({"expression": expression})
    assert time.perf_counter() - start < 0.5  # refusals are decided before any big computation
    assert result.failed
    assert result.text.startswith("error: ") and message in result.text, result.text
    assert not os.path.exists("/tmp/pwned")


def test_calculator_max_digits_option():
    (tool,) = build_tools([{"name": "calculator", "options": {"max_digits": 5}}])
    assert tool({"expression": "99999"}).text == "99999"
    assert tool({"expression": "99999 + 1"}).text == "error: result too large: more than 5 digits"


# ---------------------------------------------------------------------------------------------
# parsing and the environment


@pytest.fixture(scope="module")
def env() -> ToolEnvironment:
    return ToolEnvironment(build_tools(["calculator"]), call_cost=0.1)


def test_a_good_call_is_answered_and_charged(env):
    turn = "Let me compute that.\n" + call("calculator", expression="347*829")
    assert env.reset({"prompt": "What is 347*829?"}) == ""
    assert env.step(turn) == Observation(
        response("287663"), done=False, reward=-0.1, calls=1, failed_calls=0, outputs=["287663"]
    )


def test_a_turn_without_a_call_ends_the_episode(env):
    assert env.step("The answer is 287663.") == Observation("", done=True)
    assert env.step("I could call </tool_call> but did not") == Observation("", done=True)


def test_two_calls_in_one_turn_are_answered_in_order(env):
    turn = call("calculator", expression="2+2") + " and " + call("calculator", expression="6*7")
    observation = env.step(turn)
    assert observation.text == response("4") + "\n" + response("42")
    assert (observation.calls, observation.failed_calls, observation.done) == (2, 0, False)
    assert observation.reward == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        (
            '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>',
            "error: invalid JSON in tool call: Expecting ',' delimiter: line 1 column 58",
        ),
        (
            "<tool_call>calculator(1+1)</tool_call>",
            "error: invalid JSON in tool call: Expecting value",
        ),
        ('<tool_call>["calculator"]</tool_call>', "error: a tool call must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'error: a tool call needs "name"'),
        (
            '<tool_call>{"name": "calculator", "args": {}}</tool_call>',
            "error: unexpected key 'args' in tool call; keys: name, arguments",
        ),
        (call("calc", expression="1+1"), "error: unknown tool 'calc'; tools: calculator"),
        (call("calculator"), "error: argument 'expression': required but missing"),
        (
            call("calculator", expression=3),
            "error: argument 'expression': 3 is not of type 'string'",
        ),
        (
            call("calculator", expression="1", precision=3),
            "error: unexpected argument 'precision'; arguments: expression",
        ),
        (
            '<tool_call>{"name": "calculator", "arguments": "1+1"}</tool_call>',
            "error: arguments must be a JSON object, got string",
        ),
        (
            '<tool_call>{"name": "calculator", "arguments": {"expr',
            "error: <tool_call> without </tool_call>",
        ),
    ],
)
def test_a_bad_call_is_a_failed_call_the_policy_can_read(env, turn, message):
    observation = env.step(turn)
    assert observation.text.startswith("<tool_response>\n" + message), observation.text
    assert (observation.done, observation.calls, observation.failed_calls) == (False, 1, 1)
    assert observation.reward == pytest.approx(-0.1)


def test_calls_past_the_limit_are_failures_and_still_charged():
    env = ToolEnvironment(build_tools(["calculator"]), call_cost=1.0, max_calls_per_turn=2)
    observation = env.step("".join(call("calculator", expression=f"{i}+1") for i in range(3)))
    assert observation.text == "\n".join(
        [
            response("1"),
            response("2"),
            response("error: more than 2 tool calls in one turn; not run"),
        ]
    )
    assert (observation.calls, observation.failed_calls, observation.reward) == (3, 1, -3.0)


def test_parse_tool_calls_reads_the_hermes_format():
    turn = 'think <tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "</x>"}]}}\n</tool_call> rest'
    (parsed,) = parse_tool_calls(turn)
    assert (parsed.name, parsed.arguments, parsed.error) == ("f", {"a": [1, {"b": "</x>"}]}, None)
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>')[0].arguments == {}


def test_schema_is_what_chat_templates_take():
    (tool,) = build_tools(["calculator"])
    schema = tool.schema()
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    json.dumps(schema)  # plain data


# ---------------------------------------------------------------------------------------------
# user tools: containment in worker processes

USER_MODULE = '''
import os, subprocess, time


def square(x):
    """Square an integer, slowly."""
    time.sleep(0.5)
    return str(x * x)


def sleep_for(seconds, pid_file=None):
    """Sleep; record this process and a child it starts."""
    if pid_file:
        child = subprocess.Popen(["sleep", "1000"])
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    return "slept"


def boom():
    """Raise."""
    raise ValueError("boom")


def flood():
    """Print noise, return 10 MB."""
    print("noise on stdout")
    os.write(1, b"more noise")
    return "x" * 10_000_000


def die():
    """Exit the process."""
    os._exit(3)


def record():
    """Return a dict."""
    return {"pid": os.getpid(), "ok": True}


def undocumented():
    return "?"
'''

OBJECT = {"type": "object", "properties": {}}


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("user_tools")
    name = f"user_tools_{os.getpid()}"
    (directory / f"{name}.py").write_text(USER_MODULE)
    sys.path.insert(0, str(directory))
    yield name
    sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def user_tools(user_module):
    tools = build_tools(
        [
            {
                "function": f"{user_module}:square",
                "parameters": {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}},
                    "required": ["x"],
                },
            },
            {
                "function": f"{user_module}:sleep_for",
                "name": "sleep",
                "parameters": {
                    "type": "object",
                    "properties": {"seconds": {"type": "number"}, "pid_file": {"type": "string"}},
                },
            },
            {"function": f"{user_module}:boom", "parameters": OBJECT},
            {"function": f"{user_module}:flood", "parameters": OBJECT, "description": "Floods."},
            {"function": f"{user_module}:record", "parameters": OBJECT},
            {"function": f"{user_module}:die", "parameters": OBJECT},
        ]
    )
    yield {tool.name: tool for tool in tools}
    for tool in tools:
        tool.close()


def test_user_tool_defaults_come_from_the_function(user_tools):
    assert user_tools["square"].description == "Square an integer, slowly."
    assert user_tools["sleep"].description == "Sleep; record this process and a child it starts."
    assert user_tools["flood"].description == "Floods."


def test_user_tool_runs_in_another_process_and_returns_json(user_tools):
    result = user_tools["record"]({})
    assert json.loads(result.text)["pid"] != os.getpid()
    assert json.loads(result.text)["ok"] is True


def test_a_hanging_user_tool_times_out_and_leaves_no_process(user_tools, tmp_path):
    env = ToolEnvironment(list(user_tools.values()), timeout_s=1.0)
    pid_file = tmp_path / "pids"
    start = time.monotonic()
    observation = env.step(call("sleep", seconds=600, pid_file=str(pid_file)))
    elapsed = time.monotonic() - start
    assert observation.text == response("error: timed out after 1 s")
    assert observation.failed_calls == 1
    assert 1.0 <= elapsed < 3.0
    worker, child = map(int, pid_file.read_text().split())
    assert wait_gone([worker, child], within_s=2.0) == []
    # A fresh worker takes the killed one's place.
    assert env.step(call("sleep", seconds=0)).text == response("slept")


def test_a_raising_user_tool_is_an_error_observation(user_tools):
    observation = ToolEnvironment(list(user_tools.values())).step(call("boom"))
    assert observation.text == response("error: ValueError: boom")
    assert observation.failed_calls == 1


def test_a_user_tool_that_kills_its_process_is_an_error_observation(user_tools):
    env = ToolEnvironment(list(user_tools.values()))
    observation = env.step(call("die") + call("die"))  # the second call needs a new worker
    died = response("error: the tool's process died (exit status 3)")
    assert observation.text == died + "\n" + died
    assert (observation.calls, observation.failed_calls) == (2, 2)


def test_a_huge_user_tool_output_is_cut(user_tools):
    env = ToolEnvironment(list(user_tools.values()), max_output_chars=200)
    observation = env.step(call("flood"))
    marker = "\n... [output cut: 10000000 chars in all]"
    assert observation.text == response("x" * (200 - len(marker)) + marker)
    assert observation.failed_calls == 1


def test_concurrent_steps_each_get_their_own_answer(user_tools):
    tools = list(user_tools.values())

    def step(x: int) -> str:
        return ToolEnvironment(tools).step(call("square", x=x)).text

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(step, range(8)))
    elapsed = time.monotonic() - start
    assert answers == [response(str(x * x)) for x in range(8)]
    assert elapsed < 2.5, f"8 calls of 0.5 s took {elapsed:.1f} s: they did not run at once"


def test_user_tool_workers_die_with_a_killed_trainer(user_module, tmp_path):
    """A trainer killed by SIGKILL never closes its tools: the worker, mid-call, and what it
    started must go with it."""
    pid_file = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(sys.modules[user_module].__file__).parent)!r})
        from posttrain.tools import build_tools
        (tool,) = build_tools([{{"function": "{user_module}:sleep_for",
                                 "parameters": {{"type": "object"}}}}])
        tool({{"seconds": 600, "pid_file": {str(pid_file)!r}}}, timeout_s=600)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and len(pid_file.read_text().split()) == 2):
            assert trainer.poll() is None and time.monotonic() < deadline, "tool never started"
            time.sleep(0.05)
        worker, child = map(int, pid_file.read_text().split())
        assert running(worker) and running(child)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    assert wait_gone([worker, child], within_s=5.0) == []


# ---------------------------------------------------------------------------------------------
# the sandboxed python tool


@pytest.fixture(scope="module")
def python_env() -> ToolEnvironment:
    available, why = sandbox_available()
    if not available:
        if os.environ.get("POSTTRAIN_ALLOW_NO_SANDBOX") == "1":
            pytest.skip(f"sandbox unavailable (POSTTRAIN_ALLOW_NO_SANDBOX=1): {why}")
        pytest.fail(f"sandbox unavailable: {why}\n(set POSTTRAIN_ALLOW_NO_SANDBOX=1 to skip)")
    return ToolEnvironment(build_tools(["python"]), timeout_s=5.0, max_output_chars=4000)


def test_python_tool_prints_a_computed_value(python_env):
    observation = python_env.step(call("python", code="print(sum(i * i for i in range(10)))"))
    assert observation == Observation(
        response("285"), done=False, calls=1, failed_calls=0, outputs=["285"]
    )


def test_python_tool_reports_a_failing_program(python_env):
    observation = python_env.step(call("python", code="print('before')\nraise SystemExit(3)"))
    assert observation.text == response("error: exit status 3\nbefore")
    assert observation.failed_calls == 1


def test_python_tool_cannot_reach_the_network_not_even_loopback(python_env):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    watcher = threading.Thread(target=accept)
    watcher.start()
    code = textwrap.dedent(
        f"""
        import socket
        for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection((host, port), timeout=2).close()
                print("connected", host)
            except OSError as e:
                print("blocked", host, type(e).__name__)
        """
    )
    try:
        observation = python_env.step(call("python", code=code))
    finally:
        stop.set()
        watcher.join()
        server.close()
    assert "connected" not in observation.text
    assert "blocked 127.0.0.1" in observation.text and "blocked 1.1.1.1" in observation.text
    assert accepted == []


def test_python_tool_cannot_read_host_files(python_env, tmp_path):
    secret = f"secret-{os.getpid()}-{time.time_ns()}"
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    code = textwrap.dedent(
        f"""
        for path in [{str(path)!r}, "/etc/shadow", {str(Path(__file__).resolve())!r}]:
            try:
                print(open(path).read())
            except OSError as e:
                print(type(e).__name__, path)
        """
    )
    observation = python_env.step(call("python", code=code))
    assert secret not in observation.text
    assert f"FileNotFoundError {path}" in observation.text
    assert "FileNotFoundError /etc/shadow" in observation.text
    assert "def test_python_tool_cannot_read_host_files" not in observation.text


def test_python_tool_stops_an_infinite_loop(python_env):
    env = ToolEnvironment(list(python_env.tools.values()), timeout_s=1.0)
    start = time.monotonic()
    observation = env.step(call("python", code="print('looping', flush=True)\nwhile True: pass"))
    assert time.monotonic() - start < 4.0
    assert observation.text == response("error: timed out after 1 s; output:\nlooping")
    assert observation.failed_calls == 1


# ---------------------------------------------------------------------------------------------
# build_tools errors name the item and the field


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (
            ["calculator", "calc"],
            "tools[1]: unknown tool 'calc'; built-in tools: calculator, python "
            "(did you mean 'calculator'?)",
        ),
        (
            [{"function": "foo", "parameters": OBJECT}],
            "tools[0].function: expected 'package.module:function', got 'foo'",
        ),
        (
            [{"function": "no_such_module_here:f", "parameters": OBJECT}],
            "tools[0].function: cannot import module 'no_such_module_here'",
        ),
        (
            [{"function": "json:no_such_function", "parameters": OBJECT}],
            "tools[0].function: module 'json' has no attribute 'no_such_function'",
        ),
        ([{"function": "json:dumps"}], "tools[0].parameters: required"),
        (
            [{"function": "json:dumps", "parameters": {"type": "string"}}],
            "tools[0].parameters: expected a JSON schema of type 'object'",
        ),
        (
            [{"function": "json:dumps", "parameters": {"type": "object", "required": "x"}}],
            "tools[0].parameters: not a valid JSON schema: 'x' is not of type 'array'",
        ),
        (
            [{"function": "json:dumps", "parameters": OBJECT, "name": "two words"}],
            "tools[0].name: expected 1 to 64 letters, digits, _ or -, got 'two words'",
        ),
        (
            [{"function": "json:dumps", "parameters": OBJECT, "workers": 0}],
            "tools[0].workers: expected a positive integer, got 0",
        ),
        (
            [{"function": "json:dumps", "parameters": OBJECT, "descripton": "x"}],
            "tools[0]: unknown field 'descripton' of a user tool; fields: function, name, "
            "description, parameters, workers (did you mean 'description'?)",
        ),
        (
            [{"name": "calculator", "option": {}}],
            "tools[0]: unknown field 'option' of a built-in tool",
        ),
        (
            [{"name": "calculator", "options": {"max_digit": 5}}],
            "tools[0].options.max_digit: unknown option of calculator; options: max_digits "
            "(did you mean 'max_digits'?)",
        ),
        (
            [{"name": "calculator", "options": {"max_digits": 0}}],
            "tools[0].options.max_digits: expected an integer from 1 to 4000, got 0",
        ),
        (
            [{"name": "python", "options": {"wall_s": 3}}],
            "tools[0].options.wall_s: unknown option; python tool options: memory_mb",
        ),
        ([{"options": {}}], "tools[0].name: required"),
        (
            ["calculator", "calculator"],
            "tools[1].name: 'calculator' is already the name of tools[0]",
        ),
        (
            [3],
            "tools[0]: expected a built-in tool name (calculator, python) or a mapping, got int 3",
        ),
        ("calculator", "tools: expected a list of tools, got str"),
    ],
)
def test_build_tools_errors_name_the_item_and_field(specs, message):
    with pytest.raises(ValueError) as error:
        build_tools(specs)
    assert str(error.value).startswith(message), str(error.value)


def test_a_user_tool_without_docstring_needs_a_description(user_module):
    spec = {"function": f"{user_module}:undocumented", "parameters": OBJECT}
    with pytest.raises(ValueError, match=r"tools\[0\]\.description: required, as .* no docstring"):
        build_tools([spec])
    (tool,) = build_tools([{**spec, "description": "Returns a question mark."}])
    assert tool({}).text == "?"
    tool.close()
