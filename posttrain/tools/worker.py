"""The process a user tool runs in: `python -P worker.py REQUEST_FD REPLY_FD LIFELINE_FD`.

Started by posttrain/tools/user.py, one call at a time. Standard library only: it must start
fast, and it imports nothing of the trainer's but the user's function.

Messages on both pipes are a 4-byte big-endian length, then that many bytes of JSON:
  hello    -> {"sys_path": [...], "function": "package.module:function"}
  answer   <- {"ready": true} or {"error": "cannot import ..."}
  request  -> {"arguments": {...}, "max_chars": 512}
  reply    <- {"text": the first max_chars chars of the output, "total": its length in chars}
              or {"error": "ValueError: ..."}
stdout and stderr are /dev/null, so what the function prints cannot corrupt the replies. The
worker exits when the request pipe closes, and when its parent dies: a thread blocked on the
lifeline pipe (whose write end only the parent holds) reads end of file, even mid-call, and
kills the worker's process group: the worker and any process the function started.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()  # ASCII: a lone surrogate in a str cannot break it
    return HEADER.pack(len(body)) + body


def write_message(fd: int, message: dict[str, Any]) -> None:
    data = memoryview(encode(message))
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_message(fd: int) -> dict[str, Any] | None:
    """The next message, or None at end of file."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def load_function(spec: str) -> Callable[..., Any]:
    """`package.module:function` (or `:Class.method`) -> the callable; ValueError saying why not."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    if module_name == "__main__":
        raise ValueError(
            f"{spec!r}: a function in __main__ cannot be imported by the tool's worker process; "
            "move it into a module"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


def output_text(value: Any) -> str:
    """A tool's return value as text: a string as it is, other values as JSON when they can be."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _exit_with_parent(lifeline_fd: int) -> None:
    while os.read(lifeline_fd, 1):
        pass
    os.killpg(0, signal.SIGKILL)  # this worker and whatever the function started


def main(request_fd: int, reply_fd: int, lifeline_fd: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(lifeline_fd,), daemon=True).start()
    hello = read_message(request_fd)
    if hello is None:
        return
    sys.path[:] = hello["sys_path"]
    try:
        function = load_function(hello["function"])
    except BaseException as e:
        write_message(reply_fd, {"error": str(e)})
        return
    write_message(reply_fd, {"ready": True})
    while (request := read_message(request_fd)) is not None:
        try:
            text = output_text(function(**request["arguments"]))
            reply = {"text": text[: request["max_chars"]], "total": len(text)}
        except BaseException as e:  # SystemExit too: the worker serves the next call
            reply = {"error": f"{type(e).__name__}: {e}"}
        write_message(reply_fd, reply)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
