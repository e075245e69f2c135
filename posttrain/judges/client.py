"""Asking a judge many questions: a concurrency limit, retries with exponential backoff, and an
on-disk cache of verdicts, so a rerun of the same questions costs nothing.

A question is a chat request plus the parser of its answer. An answer the parser rejects
(malformed, empty, ambiguous or hostile: the parser only ever matches patterns, nothing is
executed or evaluated) is asked again like a failed request (after a backoff that doubles,
with jitter), at `retry_temperature` at least
(a deterministic judge would repeat itself); after `retries` more tries the question has no
verdict, and the caller counts it. The first failure of each kind is logged. A request no
retry can fix (`JudgeSetupError`: a wrong key, model or URL) stops the caller at once. Only
parsed answers are cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from posttrain.judges.backends import ChatBackend, JudgeSetupError, Messages, Reply

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Question(Generic[T]):
    messages: Messages
    parse: Callable[[Reply], T | None]
    """The verdict in the reply, or None when it holds none."""
    max_tokens: int = 512
    temperature: float = 0.0
    top_logprobs: int = 0


class VerdictCache:
    """Replies by question, in one SQLite file (safe across threads and reruns)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT)")
        self._lock = threading.Lock()

    def get(self, key: str) -> Reply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        return Reply(data["text"], data["first_token_logprobs"])

    def put(self, key: str, reply: Reply) -> None:
        value = json.dumps({"text": reply.text, "first_token_logprobs": reply.first_token_logprobs})
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, value))
            self._db.commit()


class JudgeClient:
    """Answers questions through `backend`, `concurrency` at a time. `stats` counts `asked`
    (requests sent), `cached` (answered from the cache), `errors` (requests that raised: HTTP
    errors, timeouts), `malformed` (replies without a verdict) and `failed` (questions left
    without a verdict after every retry)."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        concurrency: int = 8,
        retries: int = 3,
        backoff_s: float = 0.5,
        retry_temperature: float = 0.7,
        cache: str | Path | None = None,
    ) -> None:
        self.backend, self.concurrency = backend, concurrency
        self.retry_temperature = retry_temperature
        self.retries, self.backoff_s = retries, backoff_s
        self.cache = VerdictCache(cache) if cache else None
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def ask(self, questions: Sequence[Question[T]]) -> list[T | None]:
        """Each question's verdict (None where none came), in order."""
        if not questions:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions))) as pool:
            return list(pool.map(self._answer, questions))

    def _count(self, key: str) -> int:
        with self._lock:
            self.stats[key] += 1
            return self.stats[key]

    def _key(self, q: Question[Any]) -> str:
        blob = json.dumps(
            [self.backend.name, q.messages, q.max_tokens, q.temperature, q.top_logprobs]
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _answer(self, q: Question[T]) -> T | None:
        key = self._key(q)
        if self.cache is not None and (reply := self.cache.get(key)) is not None:
            verdict = q.parse(reply)
            if verdict is not None:
                self._count("cached")
                return verdict
        temperature = q.temperature
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            self._count("asked")
            try:
                reply = self.backend.chat(
                    q.messages,
                    max_tokens=q.max_tokens,
                    temperature=temperature,
                    top_logprobs=q.top_logprobs,
                )
            except JudgeSetupError:
                raise
            except Exception as error:  # HTTP 5xx and 429, timeouts, refused connections
                if self._count("errors") == 1:
                    log.warning(
                        "judge %s: %s: %s (retrying)",
                        self.backend.name,
                        type(error).__name__,
                        error,
                    )
                continue
            verdict = q.parse(reply)
            if verdict is None:
                if self._count("malformed") == 1:
                    log.warning(
                        "judge %s: a reply without a verdict: %.200r", self.backend.name, reply.text
                    )
                temperature = max(temperature, self.retry_temperature)
                continue
            if self.cache is not None:
                self.cache.put(key, reply)
            return verdict
        self._count("failed")
        return None
