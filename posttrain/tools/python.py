"""The `python` tool: run the policy's program in the code sandbox and show it what it printed.

Each call is a fresh `posttrain.sandbox.run_python` (no network, not even loopback; its own
filesystem root, nothing of the host's files but the system libraries and the Python install;
resource limits; docs/sandbox.md), with the wall clock and the CPU time set to the
environment's `timeout_s`. Nothing carries over between calls. The output is stdout, then
stderr; a program that exits non-zero or runs out of time fails the call, and the policy reads
the exit status or the timeout with whatever the program printed before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from posttrain.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_available
from posttrain.tools.base import Tool, ToolError

OPTIONS = ("memory_mb", "max_processes", "disk_mb", "max_file_mb", "max_open_files")
"""The SandboxLimits fields a config may set; wall_s and cpu_s come from the call's timeout."""


def python(**limits: Any) -> Tool:
    """The python tool. `limits`: SandboxLimits fields (OPTIONS) other than the defaults.

    Raises SandboxUnavailable when this machine cannot build the sandbox: posttrain never runs
    model-written code unprotected, and a tool that fails every call would waste the run.
    """
    unknown = sorted(set(limits) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option; python tool options: {', '.join(OPTIONS)}")
    # max_output_bytes: enough for any max_output_chars one would set, small enough to stop a
    # program that floods its output early.
    base = SandboxLimits(max_output_bytes=1 << 16, **limits)
    available, why = sandbox_available()
    if not available:
        raise SandboxUnavailable(f"the python tool needs the code sandbox: {why}")

    def run(arguments: dict[str, Any], timeout_s: float, max_chars: int) -> str:
        limits = dataclasses.replace(base, wall_s=timeout_s, cpu_s=timeout_s)
        try:
            result = run_python(arguments["code"], limits=limits)
        except SandboxUnavailable as e:
            raise ToolError(f"sandbox unavailable: {e}") from None
        printed = (result.stdout + result.stderr).rstrip("\n")
        if result.timed_out:
            raise ToolError(
                f"timed out after {timeout_s:g} s" + (f"; output:\n{printed}" if printed else "")
            )
        if result.truncated:
            raise ToolError(
                f"stopped: printed more than {limits.max_output_bytes} bytes; the start:\n{printed}"
            )
        if result.returncode != 0:
            raise ToolError(
                f"exit status {result.returncode}" + (f"\n{printed}" if printed else "")
            )
        return printed or "(no output: print the values you need)"

    return Tool(
        name="python",
        description=(
            "Run a Python 3 program in a sandbox (no network, no files from outside, limited time "
            "and memory) and return what it prints. Print the values you need."
        ),
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the program"}},
            "required": ["code"],
            "additionalProperties": False,
        },
        run=run,
    )
