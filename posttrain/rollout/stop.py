"""Stop strings: detect them while decoding, and cut the final text before them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopStrings:
    """Finds stop strings in completions, decoding only a short tail at each step.

    Every token of a byte-level or byte-fallback tokenizer decodes to at least one byte, so a
    stop string of b bytes that the newest token completes lies within the last b + 1 tokens.
    The tail decoded is a few tokens longer, so that artefacts at its start (a split UTF-8
    character, a stripped leading space) cannot hide a match. A match found there that ended
    before the newest token would have been found one step earlier, so a hit means this token
    completed the stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        if tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer: pass one to the sampler")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tail_tokens = max(len(s.encode("utf-8")) for s in self.stop) + 4

    def hits(self, completions: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each completion (all its tokens so far) now contains a stop string."""
        tails = [list(ids[-self.tail_tokens :]) for ids in completions]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return [any(s in text for s in self.stop) for text in texts]

    def cut(self, text: str) -> str:
        """The text up to (excluding) the earliest stop string in it."""
        starts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(starts)] if starts else text


def completion_text(
    tokenizer: Any,
    token_ids: Sequence[int],
    reason: str,
    stop_token_ids: Sequence[int],
    stop_strings: StopStrings | None,
) -> str:
    """A completion's text as every engine returns it: an eos or stop token ends the text but
    is not part of it, special tokens are skipped, and the text stops before a stop string."""
    ends_on_token = reason == "eos" or (reason == "stop" and token_ids[-1] in stop_token_ids)
    body = token_ids[:-1] if ends_on_token else token_ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    if reason == "stop" and stop_strings is not None:
        text = stop_strings.cut(text)
    return text
