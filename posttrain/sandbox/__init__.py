"""Contained execution of untrusted or unreliable code, shared by code rewards and tools:
`run_python` (python.py) runs model-written Python in a namespaced, resource-limited sandbox;
`DeadlinePool` (deadline_pool.py) is a process pool with a wall clock per call.
"""

from posttrain.sandbox.deadline_pool import TIMED_OUT, DeadlinePool
from posttrain.sandbox.python import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    run_python,
    sandbox_available,
)

__all__ = [
    "TIMED_OUT",
    "DeadlinePool",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "run_python",
    "sandbox_available",
]
