"""Where a judge's words come from: any OpenAI-compatible chat endpoint, or a local Hugging Face
model in process. A backend answers one chat request; `JudgeClient` (client.py) adds the
concurrency limit, retries, backoff and the verdict cache around it."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from posttrain.rewards.base import RewardSetupError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Reply:
    text: str
    """The judge's whole answer."""
    first_token_logprobs: dict[str, float] | None = None
    """Log-probabilities of the likeliest first tokens of the answer (token text -> logprob),
    where the backend gives them: what a yes/no question's probability is read from."""


class ChatBackend(Protocol):
    name: str
    """Which model answers (part of every cache key)."""

    def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int
    ) -> Reply: ...


class JudgeSetupError(RewardSetupError):
    """A judge request that no retry can fix (a wrong key, model or URL, a refused field): it
    stops the run with this message instead of every verdict going missing."""


class OpenAIBackend:
    """A chat endpoint of the OpenAI API shape (OpenAI, vLLM, `posttrain serve`, ...) through the
    `openai` client. A key is sent only when `api_key_env` names the environment variable that
    holds it (never a config file; an empty variable is an error). The client's own retries are
    off: `JudgeClient` retries, except on answers no retry can change (401, 403, 404, 400)."""

    def __init__(
        self, base_url: str, model: str, *, api_key_env: str = "", timeout_s: float = 60.0
    ) -> None:
        import openai

        key = "EMPTY"  # the client insists on one; endpoints without auth ignore it
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise JudgeSetupError(f"judge: api_key_env names {api_key_env!r}, which is not set")
        self.name, self.model, self.base_url = f"openai:{base_url}:{model}", model, base_url
        self.permanent = (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.BadRequestError,
        )
        self.client = openai.OpenAI(
            base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0
        )

    def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int
    ) -> Reply:
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                **extra,
            )
        except self.permanent as error:
            raise JudgeSetupError(
                f"judge at {self.base_url} (model {self.model!r}) refused the request: {error}"
            ) from error
        choice = response.choices[0]
        first = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            first = {t.token: float(t.logprob) for t in content[0].top_logprobs or []}
            first.setdefault(content[0].token, float(content[0].logprob))
        return Reply(choice.message.content or "", first)


class LocalBackend:
    """A Hugging Face causal LM in this process: the chat template when the tokenizer has one
    (else the messages' contents joined), the built-in sampler for the answer, and one forward
    pass for the first token's log-probabilities. One request at a time (a lock: the model and
    its sampler are not thread-safe). Its cache name includes the weights' size and time, so a
    retrained model is not answered from an older one's verdicts."""

    def __init__(self, path: str, *, device: str = "auto") -> None:
        from posttrain.models.loading import load_causal_lm, load_tokenizer
        from posttrain.rollout import HFSampler
        from posttrain.train.distributed import pick_device

        weights = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
        stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
        self.name = f"local:{os.path.abspath(path)}:{stamp}"
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, pick_device(device))
        self.sampler = HFSampler(self.model, self.tokenizer)
        self._lock = threading.Lock()

    def chat(
        self, messages: Messages, *, max_tokens: int, temperature: float, top_logprobs: int
    ) -> Reply:
        with self._lock:
            return self._chat(messages, max_tokens, temperature, top_logprobs)

    def _chat(
        self, messages: Messages, max_tokens: int, temperature: float, top_logprobs: int
    ) -> Reply:
        import torch

        from posttrain.rollout import SamplingParams

        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            text = "\n\n".join(m["content"] for m in messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
        text = self.sampler.generate([ids], params).completions[0].text
        first = None
        if top_logprobs:
            with torch.inference_mode():
                device = next(self.model.parameters()).device
                logits = self.model(torch.tensor([ids], device=device)).logits[0, -1].float()
            values, tokens = logits.log_softmax(-1).topk(top_logprobs)
            first = {
                self.tokenizer.decode([t]): float(v)
                for t, v in zip(tokens.tolist(), values, strict=True)
            }
        return Reply(text, first)
