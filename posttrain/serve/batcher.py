"""Concurrent requests, batched into one sampler call per group of equal sampling parameters.

Requests wait in an asyncio queue. The collector takes the first, waits `window_s` so that the
requests arriving with it join, takes everything else queued by then (requests that arrived
while the previous batch generated), groups them by `SamplingParams` and runs each group as one
`Sampler.generate` call on a single worker thread: generation never blocks the event loop, and
one batch runs at a time, so the model is never used by two threads at once.

A streamed request passes `on_tokens`: when a batch holds one, the sampler's per-step hook
hands each step's tokens from the worker thread to the event loop (`call_soon_threadsafe`, once
per step), which gives every streamed request its rows' tokens as they are decoded. A batch of
unstreamed requests runs without the hook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Protocol, TypeVar

from posttrain.rollout.interface import Completion, RolloutBatch, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
TokenSink = Callable[[list[tuple[int, int]]], None]
"""Takes the (sample index, token id) pairs of one request's rows at one decoding step."""


class StreamingSampler(Protocol):
    """A `Sampler` whose `generate` takes `HFSampler`'s per-step hook."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_tokens: Callable[[list[int], list[int]], None] | None = None,
    ) -> RolloutBatch: ...


@dataclass
class BatchStats:
    """Counters since the server started (`GET /stats`)."""

    requests: int = 0
    """Prompts submitted (a completions request with a list of k prompts counts k)."""
    sampler_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generate_seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    done: asyncio.Future[list[Completion]]
    on_tokens: TokenSink | None


class Batcher:
    """Batches `generate` calls from concurrent requests into few `sampler.generate` calls.

    window_s: how long the first request of a batch waits for others to join it.
    max_rows: prompts x n per sampler call at most (bounds the KV cache's memory).
    """

    def __init__(
        self, sampler: StreamingSampler, *, window_s: float = 0.01, max_rows: int = 64
    ) -> None:
        self.sampler = sampler
        self.window_s = window_s
        self.max_rows = max_rows
        self.stats = BatchStats()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-serve")
        self._queue: asyncio.Queue[_Job] | None = None
        self._collector: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start collecting; call from the running event loop (the app's lifespan)."""
        self._queue = asyncio.Queue()
        self._collector = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, on_tokens: TokenSink | None = None
    ) -> list[Completion]:
        """The `params.n` completions of one prompt, generated in a batch with other requests.

        on_tokens: called on the event loop after each decoding step with the (sample, token)
            pairs of this prompt's rows still running (sample in 0..n-1), the token that ends a
            row included; every call comes before the completions are returned.
        """
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        job = _Job(prompt_ids, params, asyncio.get_running_loop().create_future(), on_tokens)
        self.stats.requests += 1
        self._queue.put_nowait(job)
        return await job.done

    async def in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the generation thread, between batches (other uses of the model)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _collect(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(self.window_s)
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            for group in _groups(jobs, self.max_rows):
                await self._run(group)

    async def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.done.done()]  # skip requests whose client left
        if not jobs:
            return
        params = jobs[0].params
        generate = self.sampler.generate
        if any(job.on_tokens is not None for job in jobs):
            generate = partial(generate, on_tokens=_hand_over(jobs, params.n))
        start = time.perf_counter()
        try:
            batch = await self.in_worker(generate, [job.prompt_ids for job in jobs], params)
        except Exception as err:  # every request of the batch gets the error; the server lives on
            log.exception("sampler call for %d requests failed", len(jobs))
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(err)
            return
        seconds, n = time.perf_counter() - start, params.n
        self.stats.sampler_calls += 1
        self.stats.prompt_tokens += batch.prompt_tokens
        self.stats.completion_tokens += batch.generated_tokens
        self.stats.generate_seconds += seconds
        tokens = batch.generated_tokens
        log.info(
            "sampler call: %d requests, n=%d, %d tokens, %.2f s", len(jobs), n, tokens, seconds
        )
        for i, job in enumerate(jobs):
            if not job.done.done():
                job.done.set_result(batch.completions[i * n : (i + 1) * n])


def _hand_over(jobs: list[_Job], n: int) -> Callable[[list[int], list[int]], None]:
    """The sampler's `on_tokens` for a batch of `jobs`: on the worker thread, it sorts a step's
    tokens by job (row = job index * n + sample) and schedules their delivery on the event loop.
    Callbacks scheduled with `call_soon_threadsafe` run in order, and before the one that
    completes the worker's future, so a job gets all its tokens before its completions."""
    loop = asyncio.get_running_loop()
    sinks = {i: job.on_tokens for i, job in enumerate(jobs) if job.on_tokens is not None}

    def deliver(step: dict[int, list[tuple[int, int]]]) -> None:  # on the event loop
        for i, pairs in step.items():
            if not jobs[i].done.done():  # not for a client that left
                sinks[i](pairs)

    def on_tokens(rows: list[int], tokens: list[int]) -> None:  # on the worker thread
        step: dict[int, list[tuple[int, int]]] = {}
        for row, token in zip(rows, tokens, strict=True):
            if row // n in sinks:
                step.setdefault(row // n, []).append((row % n, token))
        if step:
            loop.call_soon_threadsafe(deliver, step)

    return on_tokens


def _groups(jobs: list[_Job], max_rows: int) -> Iterator[list[_Job]]:
    """Jobs with equal sampling params, at most `max_rows` sampled rows per group, in order."""
    by_params: dict[object, list[_Job]] = {}
    for job in jobs:
        # A seeded request runs alone: its completions then do not depend on what else arrived.
        key = job.params if job.params.seed is None else id(job)
        by_params.setdefault(key, []).append(job)
    for group in by_params.values():
        size = max(1, max_rows // group[0].params.n)
        for first in range(0, len(group), size):
            yield group[first : first + size]
