"""A process pool in which every item has its own wall-clock limit, and a stuck worker is
killed and replaced instead of blocking the caller.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a call that has started, and checkers
such as math-verify guard themselves with `signal.alarm`, which only works in the main thread
of the main process. So the checkers run here with their own timeouts off, and the parent keeps
the clock: at most `workers` items are in flight (so each starts as soon as it is submitted),
and when one passes its deadline the whole pool is killed, the item is reported as
`TIMED_OUT`, and the other in-flight items are submitted again to a fresh pool.

Workers watch their parent: a run killed with SIGKILL or SIGTERM never shuts its pool down, and
its workers would otherwise live on as orphans.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final


class _TimedOut:
    def __repr__(self) -> str:
        return "TIMED_OUT"


TIMED_OUT: Final = _TimedOut()
"""What `DeadlinePool.run` returns for an item that passed its deadline."""


def _ready() -> bool:
    return True


def _start_worker(parent: int, initializer: Callable[[], None] | None) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer()


def _exit_with_parent(parent: int) -> None:
    """Ends the worker once its parent is gone (it is then re-parented, and getppid changes)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class DeadlinePool:
    """Runs `fn(*item)` for each item on `workers` processes, each call limited to `timeout_s`.

    `initializer` runs once in every new worker (imports go there, so that start-up time is not
    charged to the first item); a worker has `start_timeout_s` to come up. `fn` and
    `initializer` must be importable module-level functions (the "spawn" context pickles them by
    name). Thread-safe: concurrent `run` calls take turns.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        workers: int = 1,
        timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        initializer: Callable[[], None] | None = None,
        context: str = "spawn",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
        self.fn, self.workers, self.timeout_s = fn, workers, timeout_s
        self.start_timeout_s, self.initializer = start_timeout_s, initializer
        self.context = multiprocessing.get_context(context)
        self.restarts = 0
        """How many times a stuck pool was killed and replaced."""
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, items: Sequence[tuple[Any, ...]]) -> list[Any]:
        """`fn(*item)` for every item, in order; `TIMED_OUT` where a call passed its deadline.
        An exception raised by `fn` propagates."""
        with self._lock:
            try:
                return self._run(items)
            except cf.process.BrokenProcessPool:
                self._kill_pool()  # a worker died (out of memory, a segfault): start afresh next time
                raise

    def _run(self, items: Sequence[tuple[Any, ...]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        pending = deque(range(len(items)))
        in_flight: dict[cf.Future, tuple[int, float]] = {}  # future -> (item index, deadline)
        while pending or in_flight:
            pool = self._started_pool()
            while pending and len(in_flight) < self.workers:
                index = pending.popleft()
                future = pool.submit(self.fn, *items[index])
                in_flight[future] = (index, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, deadline in in_flight.values())
            done, _ = cf.wait(
                in_flight,
                timeout=max(0.0, next_deadline - time.monotonic()),
                return_when=cf.FIRST_COMPLETED,
            )
            for future in done:
                index, _ = in_flight.pop(future)
                results[index] = future.result()
            now = time.monotonic()
            expired = [f for f, (_, deadline) in in_flight.items() if deadline <= now]
            if expired:
                for future in expired:
                    results[in_flight.pop(future)[0]] = TIMED_OUT
                # The killed pool takes the innocent in-flight items with it: run them again.
                pending.extendleft(sorted((i for i, _ in in_flight.values()), reverse=True))
                in_flight.clear()
                self._kill_pool()
        return results

    def _started_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        pool = cf.ProcessPoolExecutor(
            self.workers, mp_context=self.context, initializer=_start_worker,
            initargs=(os.getpid(), self.initializer),
        )  # fmt: skip
        # One trivial call per worker, so every worker has run the initializer before the first
        # timed item (workers are spawned on demand, one per submit while none is idle).
        warm_up = [pool.submit(_ready) for _ in range(self.workers)]
        done, not_done = cf.wait(warm_up, timeout=self.start_timeout_s)
        if not_done:
            self._pool = pool
            self._kill_pool()
            raise RuntimeError(
                f"worker processes for {getattr(self.fn, '__qualname__', self.fn)} did not start "
                f"within start_timeout_s={self.start_timeout_s}"
            )
        for future in done:
            future.result()  # re-raise an initializer failure here, with its own message
        self._pool = pool
        return pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self.restarts += 1
        # ProcessPoolExecutor has no public way to stop a running call before Python 3.14
        # (`kill_workers`), so kill its processes directly.
        processes = list(getattr(pool, "_processes", {}).values())
        for process in processes:
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)

    def close(self) -> None:
        """Stop the worker processes (a later `run` starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
