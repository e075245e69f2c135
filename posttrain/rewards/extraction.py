"""Pulling the final answer out of a completion: the last `\\boxed{...}`, the last
`<answer>...</answer>`, the last match of a user's regex, or the whole text.

Verifiers (math, reasoning-gym, exact match) share these so that "the answer" means the same
thing everywhere. Each returns None when the completion holds no answer, and the verifiers
score None as wrong (never as an error).
"""

from __future__ import annotations

import re
from typing import Literal

Extract = Literal["boxed", "answer_tag", "full"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None  # no box, or every box is unclosed (a truncated completion)


def last_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, stripped, or None."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def last_pattern_match(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """Group 1 (or the whole match when the pattern has no group) of the last match, or None."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = list(regex.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if regex.groups else last.group(0)).strip()


def extract_answer(text: str, extract: Extract = "boxed", pattern: str | None = None) -> str | None:
    """The answer of `text`: the last match of `pattern` when given, else by `extract`:
    "boxed" (last `\\boxed{}`), "answer_tag" (last `<answer>` block) or "full" (the stripped
    text, None when empty)."""
    if pattern is not None:
        return last_pattern_match(text, pattern)
    if extract == "boxed":
        return last_boxed(text)
    if extract == "answer_tag":
        return last_answer_tag(text)
    if extract == "full":
        return text.strip() or None
    raise ValueError(f"extract: expected 'boxed', 'answer_tag' or 'full', got {extract!r}")
