"""What goes into an answer: OpenAI's finish reasons, streamed text, token logprobs."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from posttrain.rollout.interface import Completion


def finish_reason(completion: Completion) -> str:
    """OpenAI's names: an eos token or a stop string both end a completion with "stop"."""
    return "length" if completion.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    """OpenAI's token counts; a completion's tokens include the eos or stop token that ended it."""
    generated = sum(len(c.token_ids) for c in completions)
    total = prompt_tokens + generated
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": total}


class TextStream:
    """The text of one streamed completion, decoded a token at a time as the sampler samples it.

    `push(token)` returns the text that token lets the stream send (often ""), and `rest(text)`
    what is left of the completion's final text; the two join to exactly `Completion.text`
    (eos dropped, cut right before the earliest stop string). Tokens are decoded in a sliding
    window, as vLLM's incremental detokenizer does: a token ending in a partial UTF-8 character
    adds nothing until the character's last byte arrives. The longest end of the decoded text
    that begins a stop string is held back until the next characters rule the stop string out,
    and once a stop string is decoded nothing more is sent, so no text after it is ever sent.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self._ids: list[int] = []
        self._text = ""  # decoded so far
        self._sent = 0  # characters of `_text` sent
        self._stopped = False  # a stop string was decoded: the row ends at this token
        self._start = self._read = 0  # ids[_start:_read]: decoded context for the next token

    def push(self, token: int) -> str:
        """The new text that `token`, the completion's next sampled token, lets the stream send."""
        if self._stopped:
            return ""
        self._ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self._ids[self._start : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._start :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # a special token, or a character still missing bytes
        self._text += after[len(before) :]
        self._start, self._read = self._read, len(self._ids)
        # No stop string starts before `sent`: the held-back end covered every possible start.
        starts = [i for i in (self._text.find(s, self._sent) for s in self.stop) if i >= 0]
        if starts:
            self._stopped, end = True, min(starts)
        else:
            end = len(self._text) - self._held_back()
        piece, self._sent = self._text[self._sent : end], end
        return piece

    def rest(self, text: str) -> str:
        """What is left to send of the completion's final `text` once its row has finished: the
        characters held back or still undecoded when it ended by eos or length, else ""."""
        return text[self._sent :]

    def _held_back(self) -> int:
        """Characters at the end of the unsent text that are the start of some stop string."""
        unsent = self._text[self._sent :]
        return max(
            (
                k
                for s in self.stop
                for k in range(min(len(s) - 1, len(unsent)), 0, -1)
                if unsent.endswith(s[:k])
            ),
            default=0,
        )


def top_logprobs(
    model: PreTrainedModel,
    prompt_ids: list[int],
    completions: list[Completion],
    k: int,
    temperature: float,
) -> list[list[list[tuple[int, float]]]]:
    """The k most likely tokens and their logprobs at each position of each completion.

    The sampler returns only the sampled token's logprob, so this is one extra teacher-forced
    forward over prompt + completion, on the sampler's convention: log_softmax(logits /
    temperature) over the whole vocabulary before top-p (temperature 0: of the logits).
    """
    device = next(model.parameters()).device
    found = []
    with torch.inference_mode():
        for completion in completions:
            ids = torch.tensor([prompt_ids + completion.token_ids[:-1]], device=device)
            logits = model(input_ids=ids, logits_to_keep=len(completion.token_ids)).logits[0]
            logprobs = (logits.float() / (temperature or 1.0)).log_softmax(-1)
            values, indices = logprobs.topk(k, dim=-1)
            rows = zip(indices.tolist(), values.tolist(), strict=True)
            found.append([list(zip(i, v, strict=True)) for i, v in rows])
    return found


def logprob_entries(
    tokenizer: Any,
    completion: Completion,
    alternatives: list[list[tuple[int, float]]] | None,
    first: int = 0,
    end: int | None = None,
) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` for tokens [first, end): every sampled token but a final
    eos (which the text leaves out). `bytes` is null: a token's bytes are not recoverable from
    every tokenizer, and its decoded string may hold a partial UTF-8 character."""
    count = len(completion.token_ids) - (completion.finish_reason == "eos")
    end = count if end is None else min(end, count)

    def token(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob, "bytes": None}

    return [
        {
            **token(completion.token_ids[t], completion.logprobs[t]),
            "top_logprobs": [token(i, v) for i, v in alternatives[t]] if alternatives else [],
        }
        for t in range(first, end)
    ]
