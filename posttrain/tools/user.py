"""User tools: any importable function, called in worker processes that a hang cannot outlive.

    tool = user_tool("my_package.search:lookup", parameters={"type": "object", ...})
    tool({"query": "..."}, timeout_s=5)     # lookup(query="...") in a worker process

The function is called with the validated arguments as keyword arguments; a string result is
the output, any other result is sent as JSON (else `str`). Each tool keeps up to `workers`
processes (posttrain/tools/worker.py), started on demand and reused: a call checks one out, so
calls from many threads run at once, each in its own process, and never in the trainer's
interpreter. A call past `timeout_s` kills its worker's whole process group (the function's
own subprocesses included) and reaps it before returning; the next call starts a fresh worker.
An exception comes back as its type and message. The worker sends only the first
`max_output_chars` characters of the output and its full length.

Why not `DeadlinePool`: its calls take turns under one lock, and a timeout there restarts every
worker; here only the stuck worker dies and the other calls carry on.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import jsonschema

from posttrain.tools import worker as worker_module
from posttrain.tools.base import Tool, ToolError


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    request_w: int
    reply_r: int
    lifeline_w: int


class WorkerPool:
    """Calls `function` ("package.module:function") in up to `workers` processes. Thread-safe."""

    def __init__(self, function: str, *, workers: int = 8, start_timeout_s: float = 60.0):
        self.function, self.workers, self.start_timeout_s = function, workers, start_timeout_s
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._starting = 0
        _POOLS.add(self)

    def __call__(
        self, arguments: dict[str, Any], timeout_s: float, max_chars: int
    ) -> tuple[str, int]:
        worker = self._checkout()
        reply = None
        try:
            request = {"arguments": arguments, "max_chars": max_chars}
            worker_module.write_message(worker.request_w, request)
            reply = _read_reply(worker.reply_r, time.monotonic() + timeout_s)
        except TimeoutError:
            raise ToolError(f"timed out after {timeout_s:g} s") from None
        except BrokenPipeError:
            pass  # it died: reported below
        finally:
            if reply is None:
                self._drop(worker)
            else:
                self._checkin(worker)
        if reply is None:
            raise ToolError(f"the tool's process died (exit status {worker.process.returncode})")
        if "error" in reply:
            raise ToolError(reply["error"])
        return reply["text"], reply["total"]

    def _checkout(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.process.poll() is None:
                        return worker
                    self._drop_locked(worker)
                if len(self._live) + self._starting < self.workers:
                    self._starting += 1
                    break
                self._cond.wait()
        try:
            worker = self._start()  # outside the lock: other calls go on meanwhile
        finally:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
        with self._cond:
            self._live.add(worker)
        return worker

    def _start(self) -> _Worker:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        child_ends = (request_r, reply_w, lifeline_r)
        try:
            process = subprocess.Popen(
                [sys.executable, "-P", worker_module.__file__, *map(str, child_ends)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=child_ends,
                start_new_session=True,  # its own process group: a timeout kills all of it
            )
        except OSError:
            for fd in (request_w, reply_r, lifeline_w):
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        worker = _Worker(process, request_w, reply_r, lifeline_w)
        try:
            hello = {"sys_path": sys.path, "function": self.function}
            worker_module.write_message(request_w, hello)
            answer = _read_reply(reply_r, time.monotonic() + self.start_timeout_s)
        except (TimeoutError, BrokenPipeError) as e:
            answer = {"error": f"{type(e).__name__} after {self.start_timeout_s:g} s"}
        if answer is None or "error" in answer:
            _terminate(worker)
            why = "it exited" if answer is None else answer["error"]
            raise ToolError(f"the tool's process did not start: {why}")
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._cond:
            if worker in self._live:
                self._idle.append(worker)
            self._cond.notify()

    def _drop(self, worker: _Worker) -> None:
        with self._cond:
            self._drop_locked(worker)

    def _drop_locked(self, worker: _Worker) -> None:
        if worker in self._live:
            self._live.discard(worker)
            _terminate(worker)
        self._cond.notify()

    def close(self) -> None:
        """Kill every worker; a later call starts new ones. A call in flight fails ("died")."""
        with self._cond:
            idle, self._idle = self._idle, []
            for worker in idle:
                self._drop_locked(worker)
            for worker in self._live:  # busy: their callers see end of file and drop them
                _kill_group(worker)


_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS):
        pool.close()


def _terminate(worker: _Worker) -> None:
    """SIGKILL the worker's process group, reap the worker, close its pipes."""
    _kill_group(worker)
    worker.process.wait()
    for fd in (worker.request_w, worker.reply_r, worker.lifeline_w):
        os.close(fd)


def _kill_group(worker: _Worker) -> None:
    if worker.process.returncode is None:  # unreaped, so its group id cannot have been reused
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)


def _read_reply(fd: int, deadline: float) -> dict[str, Any] | None:
    """One message from `fd`, or None at end of file; TimeoutError at `deadline`. Waits in
    poll(2), so the GIL is free meanwhile."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = bytearray()
    size = None
    while size is None or len(data) < worker_module.HEADER.size + size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        data += chunk
        if size is None and len(data) >= worker_module.HEADER.size:
            size = worker_module.HEADER.unpack_from(data)[0]
    return json.loads(data[worker_module.HEADER.size :])


def user_tool(
    function: str,
    *,
    parameters: dict[str, Any],
    name: str | None = None,
    description: str | None = None,
    workers: int = 8,
) -> Tool:
    """A tool calling `function` ("package.module:function") in worker processes.

    `name` defaults to the function's name, `description` to the first line of its docstring.
    The function is imported here too, so that a wrong path fails when the tools are built.
    Raises ValueError naming the field at fault.
    """
    try:
        target = worker_module.load_function(function)
    except ValueError as e:
        raise ValueError(f"function: {e}") from None
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(
            f"parameters: expected a JSON schema of type 'object' (the arguments), got {parameters!r}"
        )
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        raise ValueError(f"parameters: not a valid JSON schema: {e.message}") from None
    if description is not None and not isinstance(description, str):
        raise ValueError(f"description: expected a string, got {description!r}")
    if description is None:
        doc = inspect.getdoc(target)
        if not doc:
            raise ValueError(f"description: required, as {function!r} has no docstring")
        description = doc.strip().splitlines()[0]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    pool = WorkerPool(function, workers=workers)
    return Tool(name or target.__name__, description, parameters, run=pool)
