"""An OpenAI-compatible HTTP server over the built-in sampler: `posttrain serve MODEL_DIR`.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /stats (the
batcher's counters). A stream sends each choice's text as its tokens are decoded (the sampler's
`on_tokens` hook, through the batcher), and its finish reasons, logprobs and usage once the
request's batch has finished (docs/serve.md).
Every refusal is OpenAI's JSON error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from posttrain.data.tokenize import prompt_ids, uses_chat_template
from posttrain.rollout.hf_sampler import HFSampler
from posttrain.rollout.interface import Completion, SamplingParams
from posttrain.serve.answers import TextStream, finish_reason, logprob_entries, top_logprobs, usage
from posttrain.serve.batcher import Batcher, TokenSink
from posttrain.serve.schema import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)
Chunks = AsyncIterator[dict[str, Any]]


class APIError(Exception):
    """A refused request: its HTTP status, message, the field at fault and OpenAI's code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def create_app(
    sampler: HFSampler,
    model_name: str,
    *,
    api_key: str | None = None,
    batch_window_s: float = 0.01,
    max_batch_rows: int = 64,
    max_model_len: int | None = None,
) -> FastAPI:
    """The app serving `sampler.model` (with `sampler.tokenizer`) under the name `model_name`.

    api_key: when set, every request needs the header `Authorization: Bearer <api_key>`.
    batch_window_s, max_batch_rows: see `Batcher` (its window_s and max_rows).
    max_model_len: the most prompt + max_tokens tokens; default max_position_embeddings.
    """
    tokenizer = sampler.tokenizer
    context = max_model_len or getattr(sampler.text_config, "max_position_embeddings", None)
    chat_template = uses_chat_template(tokenizer, "auto")
    batcher = Batcher(sampler, window_s=batch_window_s, max_rows=max_batch_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    # No /docs, /redoc or /openapi.json: the API is OpenAI's, and the pages fetch scripts online.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _answer_errors_as_openai(app, api_key)

    def check_model(name: str) -> None:
        if name != model_name:
            message = f"the model {name!r} does not exist; this server serves {model_name!r}"
            raise APIError(404, message, "model", "model_not_found")

    def sampling(
        request: ChatRequest | CompletionRequest, length: int, max_tokens: int | None, field: str
    ) -> SamplingParams:
        """The request's sampling params, once its prompt and max_tokens fit the context."""
        if length == 0:
            raise APIError(400, f"{field} is empty: expected at least one token", field)
        if context is not None and length + (max_tokens or 1) > context:
            asked = f" plus max_tokens={max_tokens}" if max_tokens else ""
            message = (
                f"this model's maximum context length is {context} tokens; the {field} has "
                f"{length} tokens{asked}: shorten it"
            )
            raise APIError(400, message, field, "context_length_exceeded")
        try:
            return SamplingParams(
                n=request.n,
                max_new_tokens=max_tokens or (context - length if context else 256),
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stop_strings,
                seed=request.seed,
            )
        except ValueError as err:  # what pydantic cannot see, e.g. an empty stop string
            raise APIError(400, str(err).removeprefix("SamplingParams."), "stop") from err

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "posttrain"}
        return {"object": "list", "data": [card]}

    @app.get("/stats")
    async def stats() -> dict[str, int | float]:
        return batcher.stats.as_dict()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> Any:
        check_model(request.model)
        if not chat_template:
            raise APIError(400, "the model has no chat template: use /v1/completions", "messages")
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        try:
            ids = prompt_ids(tokenizer, [m.as_dict() for m in request.messages], chat=True)
        except TemplateError as err:  # templates may refuse a role or an order of turns
            message = f"the chat template refused the messages: {err}"
            raise APIError(400, message, "messages") from err
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = sampling(request, len(ids), max_tokens, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        head["model"] = model_name

        async def generate(
            on_tokens: TokenSink | None = None,
        ) -> tuple[list[Completion], list[Any]]:
            completions = await batcher.generate(ids, params, on_tokens)
            top: list[Any] = [None] * len(completions)
            if request.logprobs and request.top_logprobs:
                k, temperature = request.top_logprobs, params.temperature
                args = (sampler.model, ids, completions, k, temperature)
                top = await batcher.in_worker(top_logprobs, *args)
            return completions, top

        def logprobs(c: Completion, top: Any) -> Any:
            if not request.logprobs:
                return None
            return {"content": logprob_entries(tokenizer, c, top), "refusal": None}

        if request.stream:

            async def chunks() -> Chunks:
                streams = [TextStream(tokenizer, params.stop) for _ in range(params.n)]
                steps: asyncio.Queue[list[tuple[int, int]] | None] = asyncio.Queue()
                task = asyncio.create_task(generate(steps.put_nowait))
                try:
                    async for i, piece in _decoded(task, steps, streams):
                        yield _choice(i, delta={"content": piece}, logprobs=None)
                    completions, alternatives = await task
                finally:
                    task.cancel()  # the client left: its rows are no longer sent on
                for i, (c, top) in enumerate(zip(completions, alternatives, strict=True)):
                    rest, entries = streams[i].rest(c.text or ""), logprobs(c, top)
                    if rest or entries:  # held-back text, and every token's logprobs at once
                        yield _choice(i, delta={"content": rest}, logprobs=entries)
                    yield _choice(i, delta={}, logprobs=None, finish_reason=finish_reason(c))
                if request.stream_options and request.stream_options.include_usage:
                    yield {"choices": [], "usage": usage(len(ids), completions)}

            role = {"role": "assistant", "content": ""}
            opening = [_choice(i, delta=role, logprobs=None) for i in range(params.n)]
            head["object"] = "chat.completion.chunk"
            return _stream(head, opening, chunks())

        completions, alternatives = await generate()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs(c, top),
                "finish_reason": finish_reason(c),
            }
            for i, (c, top) in enumerate(zip(completions, alternatives, strict=True))
        ]
        answer = {**head, "object": "chat.completion", "choices": choices}
        return {**answer, "usage": usage(len(ids), completions)}

    @app.post("/v1/completions")
    async def complete(request: CompletionRequest) -> Any:
        check_model(request.model)
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not texts:
            raise APIError(400, "prompt is an empty list: expected at least one prompt", "prompt")
        prompts = [prompt_ids(tokenizer, text, chat=False) for text in texts]
        # Prompt i samples seeded stream i, as it would in one sampler call with the others.
        params = [
            replace(sampling(request, len(ids), request.max_tokens, "prompt"), first_prompt=i)
            for i, ids in enumerate(prompts)
        ]
        prompt_tokens = sum(len(ids) for ids in prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
        head |= {"created": int(time.time()), "model": model_name}

        async def generate(on_tokens: TokenSink | None = None) -> list[Completion]:
            # One job per prompt, so that they join a batch together; choice i * n + j is
            # sample j of prompt i, as OpenAI orders them.
            def sink(i: int) -> TokenSink | None:
                if on_tokens is None:
                    return None
                return lambda pairs: on_tokens([(i * request.n + j, t) for j, t in pairs])

            jobs = [
                batcher.generate(ids, p, sink(i))
                for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
            ]
            return [c for found in await asyncio.gather(*jobs) for c in found]

        if request.stream:

            async def chunks() -> Chunks:
                streams = [
                    TextStream(tokenizer, request.stop_strings)
                    for _ in range(len(prompts) * request.n)
                ]
                steps: asyncio.Queue[list[tuple[int, int]] | None] = asyncio.Queue()
                task = asyncio.create_task(generate(steps.put_nowait))
                try:
                    async for i, piece in _decoded(task, steps, streams):
                        yield _choice(i, text=piece, logprobs=None)
                    completions = await task
                finally:
                    task.cancel()  # the client left: its rows are no longer sent on
                for i, c in enumerate(completions):
                    if rest := streams[i].rest(c.text or ""):
                        yield _choice(i, text=rest, logprobs=None)
                    yield _choice(i, text="", logprobs=None, finish_reason=finish_reason(c))
                if request.stream_options and request.stream_options.include_usage:
                    yield {"choices": [], "usage": usage(prompt_tokens, completions)}

            return _stream(head, [], chunks())

        completions = await generate()
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c)}
            for i, c in enumerate(completions)
        ]
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completions)}

    app.state.batcher = batcher
    return app


def _choice(index: int, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    """A stream chunk's body holding one choice."""
    return {"choices": [{"index": index, **fields, "finish_reason": finish_reason}]}


async def _decoded(
    generation: asyncio.Future[Any],
    steps: asyncio.Queue[list[tuple[int, int]] | None],
    streams: list[TextStream],
) -> AsyncIterator[tuple[int, str]]:
    """(choice, new text) as the tokens that `generation` puts into `steps` as (choice, token)
    pairs are decoded, until `generation` is done (its tokens all come before)."""
    generation.add_done_callback(lambda _: steps.put_nowait(None))
    while (step := await steps.get()) is not None:
        for i, token in step:
            if piece := streams[i].push(token):
                yield i, piece


def _stream(head: dict[str, Any], opening: list[dict[str, Any]], rest: Chunks) -> Response:
    """Server-sent events: `opening` chunks at once, then those of `rest`, then `[DONE]`."""

    async def events() -> AsyncIterator[str]:
        for chunk in opening:
            yield f"data: {json.dumps({**head, **chunk})}\n\n"
        try:
            async for chunk in rest:
                yield f"data: {json.dumps({**head, **chunk})}\n\n"
        except Exception as err:  # the status line is sent: report the failure in the stream
            log.exception("a streamed request failed")
            error = {
                "message": f"internal error: {type(err).__name__}: {err}",
                "type": "server_error",
            }
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _answer_errors_as_openai(app: FastAPI, api_key: str | None) -> None:
    """Bearer-token check, and every error (bad JSON, invalid field, unknown route, crash) as an
    OpenAI error body: a 4xx names the field; a 500 names the exception, without its traceback
    (which goes to the server's log)."""

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable[..., Awaitable[Response]]):
        if api_key is not None:
            sent = request.headers.get("authorization", "")
            scheme, _, key = sent.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.encode(), api_key.encode()
            ):
                what = "no API key given" if not sent else "incorrect API key"
                message = f"{what}: send the header 'Authorization: Bearer <key>'"
                return error_response(401, message, code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def refused(request: Request, err: APIError) -> Response:
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0]
        if "json" not in request.headers.get("content-type", ""):
            return error_response(400, "send the body as JSON (Content-Type: application/json)")
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON: {reason}")
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        if first["type"] == "extra_forbidden":
            return error_response(400, f"unknown or unsupported field {field!r}", field)
        return error_response(400, f"{field}: {first['msg']}", field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(err.status_code, message)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(err).__name__}: {err}")


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key_env: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_window_ms: float = 10.0,
    max_batch_rows: int = 64,
    max_model_len: int | None = None,
    seed: int = 0,
) -> None:
    """Load `model_dir` and serve it until interrupted: the `posttrain serve` command."""
    import torch
    import uvicorn

    from posttrain.models.loading import load_causal_lm, load_tokenizer

    api_key = None
    if api_key_env:  # the key comes from the environment, so it never shows in `ps`
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: the environment variable {api_key_env} is empty")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_dir, key="MODEL_DIR")
    model = load_causal_lm(model_dir, target, dtype=dtype, key="MODEL_DIR")
    sampler = HFSampler(model.requires_grad_(False).eval(), tokenizer, seed=seed)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(
        sampler,
        name,
        api_key=api_key,
        batch_window_s=batch_window_ms / 1000,
        max_batch_rows=max_batch_rows,
        max_model_len=max_model_len,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    auth = f"bearer token from ${api_key_env}" if api_key else "no API key"
    log.info("serving %s as %r at http://%s:%d/v1 (%s)", model_dir, name, host, port, auth)
    uvicorn.run(app, host=host, port=port, log_level="info")
