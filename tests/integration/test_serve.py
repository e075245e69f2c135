"""`posttrain serve` over real HTTP on loopback, driven by the `openai` client: answers equal the
built-in sampler's, streams send their text while it is generated and join to the same text,
concurrent requests share sampler calls, bad requests and missing keys get OpenAI-style 4xx
errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from posttrain.data.tokenize import prompt_ids
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.rollout import HFSampler, SamplingParams
from posttrain.rollout.stop import StopStrings
from posttrain.serve.answers import TextStream
from posttrain.serve.app import create_app
from tests.servers import serve_in_thread

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}]


def load_sampler(model_dir) -> HFSampler:
    model = load_causal_lm(str(model_dir), torch.device("cpu")).requires_grad_(False).eval()
    return HFSampler(model, load_tokenizer(str(model_dir)), seed=0)


def http(method: str, url: str, body: bytes | None = None, **headers: str) -> tuple[int, dict]:
    """(status, JSON body) of a plain request, for what the openai client will not send."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def url(tiny_qwen2) -> Iterator[str]:
    """A server without an API key; its batching window is wide enough for threads to meet."""
    app = create_app(load_sampler(tiny_qwen2), "tiny", batch_window_s=0.05)
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_qwen2) -> HFSampler:
    """The built-in sampler on its own copy of the model: what the server must reproduce."""
    return load_sampler(tiny_qwen2)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "seeded"])
def test_chat_equals_the_sampler_with_its_logprobs(client, reference, temperature):
    ids = prompt_ids(reference.tokenizer, MESSAGES, chat=True)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=5)
    expected = reference.generate([ids], params).completions[0]
    answer = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=temperature,
        seed=5,
        logprobs=True,
        top_logprobs=3,
    )
    choice = answer.choices[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        len(ids),
        len(expected.token_ids),
    )
    content = choice.logprobs.content
    body = expected.token_ids[: len(content)]
    assert [t.token for t in content] == [reference.tokenizer.decode([i]) for i in body]
    assert [t.logprob for t in content] == pytest.approx(expected.logprobs[: len(body)], abs=1e-5)
    # The alternatives: the top 3 of log_softmax(logits / temperature) by teacher forcing.
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids + expected.token_ids])).logits[0]
    logprobs = (logits[len(ids) - 1 : -1] / (temperature or 1.0)).log_softmax(-1)
    top3 = logprobs.topk(3).values[: len(content)].tolist()
    assert [[t.logprob for t in token.top_logprobs] for token in content] == [
        pytest.approx(row, abs=1e-4) for row in top3
    ]
    if temperature == 0:  # greedy: the sampled token is the most likely one
        assert all(token.top_logprobs[0].token == token.token for token in content)


def test_text_completion_of_two_prompts_n2_equals_the_sampler(client, reference):
    prompts = ["The sky is", "1 2 3"]
    answer = client.completions.create(
        model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0
    )
    ids = [prompt_ids(reference.tokenizer, p, chat=False) for p in prompts]
    expected = reference.generate(ids, SamplingParams.greedy(max_new_tokens=6, n=2)).completions
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]  # sample j of prompt i: i * n + j
    assert [c.text for c in answer.choices] == [c.text for c in expected]
    assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
    assert answer.usage.completion_tokens == sum(len(c.token_ids) for c in expected)


def test_sampled_n_gives_distinct_choices_and_a_seed_repeats_them(client):
    def texts(seed: int) -> list[str]:
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, n=3, max_tokens=8, temperature=1.0, seed=seed
        )
        assert [c.index for c in answer.choices] == [0, 1, 2]
        ended_early = sum(c.finish_reason != "length" for c in answer.choices)
        assert (answer.usage.completion_tokens == 3 * 8) == (ended_early == 0)
        return [c.message.content for c in answer.choices]

    first = texts(seed=7)
    assert len(set(first)) > 1
    assert texts(seed=7) == first
    assert texts(seed=8) != first


def test_stop_string_cuts_the_text(client):
    def sample(**fields):
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3, **fields
        )
        return answer if fields.get("stream") else answer.choices[0]

    text = sample().message.content
    stop = next(ch for ch in text[1:] if ch.isprintable() and ch != "\ufffd" and text.index(ch))
    cut = sample(stop=[stop, "never appears"])
    assert (cut.message.content, cut.finish_reason) == (text[: text.index(stop)], "stop")
    chunks = list(sample(stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.message.content


@pytest.mark.parametrize(
    ("stop", "pieces", "rest"),
    [
        ((), ["h", "é", "l", "l", "o", " ", "w", "ö", "r", "l", "d", " ", "✓"], ""),
        # Cut right before "wör": "w" and "wö" are held back, then "wör" ends the stream.
        (("wör",), ["h", "é", "l", "l", "o", " "], ""),
        # "w" is held back until "ö" rules "wx" out; "✓" is left when the row ends by length.
        (("wx", "✓✓"), ["h", "é", "l", "l", "o", " ", "wö", "r", "l", "d", " "], "✓"),
    ],
    ids=["no-stop", "stop-string", "held-back"],
)
def test_text_stream_never_splits_a_character_nor_sends_a_stop_string(
    tiny_qwen2, stop, pieces, rest
):
    tokenizer = load_tokenizer(str(tiny_qwen2))  # one token per byte: "é" is two tokens
    whole = "héllo wörld ✓"
    ids = tokenizer.encode(whole, add_special_tokens=False) + [tokenizer.eos_token_id]
    stream = TextStream(tokenizer, stop)
    sent = [piece for piece in (stream.push(token) for token in ids) if piece]
    assert sent == pieces
    text = StopStrings(tokenizer, stop).cut(whole) if stop else whole  # the sampler's text
    assert stream.rest(text) == rest and "".join(sent) + rest == text


def test_streaming_chunks_join_to_the_whole_answer(client):
    fields = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**fields)
    chunks = list(
        client.chat.completions.create(
            **fields, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 1  # token by token, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    tokens = [token for logprobs in streamed for token in logprobs.content]
    assert tokens == whole.choices[0].logprobs.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # Two prompts, n=2: the choices' pieces interleave; choice i * n + j is sample j of prompt i.
    fields = dict(model="tiny", prompt=["abc", "xyz"], n=2, max_tokens=8, temperature=1, seed=4)
    texts = [c.text for c in client.completions.create(**fields).choices]
    joined = ["", "", "", ""]
    for chunk in client.completions.create(**fields, stream=True):
        joined[chunk.choices[0].index] += chunk.choices[0].text
    assert joined == texts and texts[0] not in (texts[1], texts[2])  # not all alike


def test_streaming_sends_the_text_while_it_is_generated(client):
    """Tokens go out as they are decoded, not when the batch ends: the first text arrives long
    before the last, and the pieces still join to the unstreamed answer."""
    fields = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=1.0, seed=0)
    whole = client.chat.completions.create(**fields)
    assert whole.usage.completion_tokens == 200  # this seed does not sample eos
    start, arrivals, pieces = time.perf_counter(), [], []
    for chunk in client.chat.completions.create(**fields, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
            pieces.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - start
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 5
    assert arrivals[0] < 0.5 * total, f"first text after {arrivals[0]:.2f} s of {total:.2f} s"
    assert arrivals[-1] - arrivals[0] > 0.5 * total, (
        f"text arrived from {arrivals[0]:.2f} to {arrivals[-1]:.2f} s of {total:.2f} s"
    )


def test_concurrent_requests_share_sampler_calls(client, url):
    def ask(i: int) -> str:
        answer = client.completions.create(
            model="tiny", prompt=f"request {i}", max_tokens=8, temperature=0
        )
        return answer.choices[0].finish_reason

    _, before = http("GET", f"{url}/stats")
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(ask, range(8)))
    _, after = http("GET", f"{url}/stats")
    assert all(r in ("stop", "length") for r in reasons)
    assert after["requests"] - before["requests"] == 8
    calls = after["sampler_calls"] - before["sampler_calls"]
    assert 1 <= calls <= 4, f"8 concurrent requests took {calls} sampler calls"


def test_bad_requests_get_openai_errors_not_500(client, url):
    def refused(error: type[openai.APIStatusError], **fields) -> str:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **fields})
        return caught.value.body["message"]

    assert "'gpt-4' does not exist" in refused(openai.NotFoundError, model="gpt-4")
    assert refused(openai.BadRequestError, temperature=5).startswith("temperature:")
    assert refused(openai.BadRequestError, n=0).startswith("n:")
    too_long = [{"role": "user", "content": "x" * 5000}]
    assert "maximum context length is 4096" in refused(openai.BadRequestError, messages=too_long)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "'tools'" in refused(openai.BadRequestError, tools=tools)
    assert "logprobs=true" in refused(openai.BadRequestError, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)

    json_type = {"Content-Type": "application/json"}
    status, body = http("POST", f"{url}/v1/chat/completions", b'{"model": "tiny",', **json_type)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http("GET", f"{url}/v1/no-such-route")
    assert status == 404 and body["error"]["message"] == "GET /v1/no-such-route: Not Found"
    status, _ = http("GET", f"{url}/v1/models")  # no key needed on a server started without one
    assert status == 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_server_with_api_key_env_refuses_missing_and_wrong_keys(tiny_qwen2, tmp_path):
    port = free_port()
    env = {**os.environ, "POSTTRAIN_TEST_KEY": "s3cret"}
    command = [sys.executable, "-m", "posttrain.cli", "serve", str(tiny_qwen2), "--port", str(port)]
    command += ["--model-name", "tiny", "--api-key-env", "POSTTRAIN_TEST_KEY"]
    log = tmp_path / "server.log"
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start in 60 s"
            try:
                status, body = http("GET", f"{base}/v1/models")
                break
            except urllib.error.URLError:
                time.sleep(0.2)
        assert status == 401 and "no API key given" in body["error"]["message"]

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)

        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client("wrong").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        answer = client("s3cret").chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2
        )
        assert answer.usage.completion_tokens >= 1
        status, _ = http("GET", f"{base}/stats", Authorization="bearer s3cret")  # any case
        assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
