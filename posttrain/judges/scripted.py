"""A scripted judge behind a real OpenAI-compatible HTTP endpoint: it reads posttrain's judge
prompts, scores the responses with a hidden gold rule (any posttrain reward), and answers with
chosen imperfections (noise, a position bias, malformed or hostile replies, failures, delays).
Tests and the RLAIF demo use it where a real LLM judge is not available offline.

    with serve_scripted(ScriptedJudge(rule=[{"name": "sentiment"}], noise=0.2)) as url:
        ...  # JudgeConfig(base_url=url, ...)

Every draw is a function of the question's text and how many times it was asked before, so a
run is reproducible whatever the order concurrent requests arrive in, and a retry can differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PAIR = re.compile(
    r"\[User Question\]\n(?P<prompt>.*)\n\n\[The Start of Assistant A's Answer\]\n(?P<a>.*)\n"
    r"\[The End of Assistant A's Answer\]\n\n\[The Start of Assistant B's Answer\]\n(?P<b>.*)\n"
    r"\[The End of Assistant B's Answer\]",
    re.S,
)
_SINGLE = re.compile(
    r"\[Question\]\n(?P<prompt>.*)\n\n\[The Start of Assistant's Answer\]\n(?P<response>.*)\n"
    r"\[The End of Assistant's Answer\]",
    re.S,
)
_SCALE = re.compile(r"scale of (-?[\d.]+) to (-?[\d.]+)")


@dataclass
class ScriptedJudge:
    rule: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "sentiment"}])
    """The hidden gold rule: reward specs (posttrain.rewards) scoring (prompt, response)."""
    noise: float = 0.0
    """Pairwise: A wins with probability sigmoid((gold_A - gold_B) / noise) (0: always the
    better one). Pointwise: Gaussian noise of this std on the rating's [0, 1] position. Yes/no:
    P(yes) = sigmoid(gold / noise)."""
    tie_margin: float = 0.0
    """Pairwise: gold scores closer than this are a tie ([[C]])."""
    position_bias: float = 0.0
    """Pairwise: the chance of answering [[A]] whatever the responses."""
    malformed: float = 0.0
    """The chance of a reply with no verdict in it."""
    hostile: float = 0.0
    """The chance of a reply with markup, code and two verdicts in it."""
    fail: float = 0.0
    """The chance of an HTTP 500."""
    slow_s: float = 0.0
    """Delay of every reply, in seconds."""
    seed: int = 0
    requests: Counter = field(default_factory=Counter)
    """Requests answered, by kind (pairwise, pointwise, yes_no, critique, revision, error)."""

    def __post_init__(self) -> None:
        from posttrain.rewards import RewardSpec, build_reward

        specs = [RewardSpec.model_validate(spec) for spec in self.rule]
        self._gold = [(build_reward(s.name, **s.options), s.weight) for s in specs]
        self._asked: Counter[str] = Counter()
        self._lock = threading.Lock()

    def gold(self, prompt: str, response: str) -> float:
        return sum(w * float(fn([prompt], [response]).scores[0]) for fn, w in self._gold)

    def _rng(self, body: str) -> random.Random:
        with self._lock:
            self._asked[body] += 1
            nth = self._asked[body]
        digest = hashlib.sha256(f"{self.seed}:{nth}:{body}".encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def reply(self, messages: list[dict[str, str]]) -> tuple[int, str, dict | None]:
        """(HTTP status, reply text, first-token log-probs or None) for a chat request."""
        body = json.dumps(messages)
        rng = self._rng(body)
        if self.slow_s:
            time.sleep(self.slow_s)
        if rng.random() < self.fail:
            self._count("error")
            return 500, "scripted failure", None
        if rng.random() < self.malformed:
            return 200, "I cannot decide between these.", None
        if rng.random() < self.hostile:
            return (
                200,
                '<script>alert(1)</script> __import__("os").system("true") [[A]] [[B]]',
                None,
            )
        last = messages[-1]["content"]
        if last.startswith("CritiqueRequest"):
            self._count("critique")
            return 200, "The response could be kinder and more positive.", None
        if last.startswith("RevisionRequest"):
            self._count("revision")
            return 200, messages[1]["content"].rstrip(". ") + ", and it was great.", None
        if (m := _PAIR.search(last)) is not None:
            self._count("pairwise")
            return 200, self._pairwise(rng, m["prompt"], m["a"], m["b"]), None
        if (m := _SINGLE.search(last)) is not None and "Yes or No" in last:
            self._count("yes_no")
            p_yes = _sigmoid(self.gold(m["prompt"], m["response"]), self.noise)
            word = "Yes" if p_yes >= 0.5 else "No"
            p_yes = min(max(p_yes, 1e-6), 1 - 1e-6)
            return 200, word, {"Yes": math.log(p_yes), "No": math.log(1 - p_yes)}
        if (m := _SINGLE.search(last)) is not None:
            self._count("pointwise")
            low, high = (float(x) for x in _SCALE.search(messages[0]["content"]).groups())
            position = (self.gold(m["prompt"], m["response"]) + 1) / 2 + rng.gauss(0, self.noise)
            rating = round(low + (high - low) * min(max(position, 0.0), 1.0))
            return 200, f"The answer is adequate. Rating: [[{rating}]]", None
        self._count("error")
        return 400, "the scripted judge does not know this question", None

    def _pairwise(self, rng: random.Random, prompt: str, a: str, b: str) -> str:
        if rng.random() < self.position_bias:
            return "Assistant A's answer is better. [[A]]"
        gold_a, gold_b = self.gold(prompt, a), self.gold(prompt, b)
        if abs(gold_a - gold_b) < self.tie_margin or gold_a == gold_b:
            return "Both answers are equally good. [[C]]"
        a_wins = rng.random() < _sigmoid(gold_a - gold_b, self.noise)
        return "After comparing both answers: " + ("[[A]]" if a_wins else "[[B]]")

    def _count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1


def _sigmoid(x: float, temperature: float) -> float:
    if temperature <= 0:
        return 1.0 if x > 0 else 0.0 if x < 0 else 0.5
    return 1 / (1 + math.exp(-x / temperature))


def _handler(judge: ScriptedJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection per client thread
        disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms ACK wait

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(
                200,
                {
                    "object": "list",
                    "data": [{"id": "scripted", "object": "model", "owned_by": "posttrain"}],
                },
            )

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text, first = judge.reply(request["messages"])
            if status != 200:
                self._send(status, {"error": {"message": text, "type": "server_error"}})
                return
            logprobs = None
            if first is not None and request.get("logprobs"):
                top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in first.items()]
                logprobs = {
                    "content": [
                        {
                            "token": text,
                            "logprob": first.get(text, 0.0),
                            "bytes": None,
                            "top_logprobs": top,
                        }
                    ]
                }
            self._send(
                200,
                {
                    "id": "scripted",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", "scripted"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": logprobs,
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                },
            )

    return Handler


@contextmanager
def serve_scripted(judge: ScriptedJudge, port: int = 0) -> Iterator[str]:
    """Serve `judge` on 127.0.0.1 (`port` 0: a free one) in a background thread; yields the
    base URL (`http://127.0.0.1:PORT/v1`)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(judge))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
