"""Sentences to continue, judged by VADER sentiment: the classic "make the continuation
positive" RLHF demo (Ziegler et al. 2019 used IMDB reviews and a sentiment classifier), offline.

No real corpus installs offline, so sentences are drawn from a fixed list of neutral, positive
and negative words; a prompt is a sentence's first 2-3 words, its completion (the demonstration
SFT imitates) the rest and a full stop. A third of the words carry sentiment, so an SFT'd model
continues with any mixture and the sentiment reward has room to move. Held-out prompts are
chosen by hashing the prompt text (`splits.py`), so no held-out prompt is ever trained on.
"""

from __future__ import annotations

import random

from posttrain.tasks.splits import check_split, is_held_out, split_seed

NEUTRAL = ["the", "model", "data", "train", "step", "batch", "code", "test", "day", "team",
           "and", "was", "is", "a", "of", "this", "run", "we", "it", "very"]  # fmt: skip
POSITIVE = ["good", "great", "happy", "love", "nice", "best", "fine", "fun", "win", "glad"]
NEGATIVE = ["bad", "sad", "hate", "awful", "poor", "worst", "ugly", "fail", "lost", "angry"]
WORDS = NEUTRAL * 2 + POSITIVE + NEGATIVE


def make(split: str, size: int, seed: int = 0, *, eval_fraction: float = 0.1) -> list[dict]:
    """`size` rows `{id, prompt, completion}` of `split` ("train" or "eval"); prompts repeat
    (there are only so many 2-3 word openings), each row with its own completion."""
    check_split(split, eval_fraction)
    rng = random.Random(split_seed(seed, split))
    rows: list[dict] = []
    while len(rows) < size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 9))]
        cut = rng.randint(2, 3)
        prompt = " ".join(words[:cut])
        if is_held_out(prompt, eval_fraction) != (split == "eval"):
            continue
        completion = " " + " ".join(words[cut:]) + "."
        rows.append({"id": f"sentence-{split}-{seed}-{len(rows)}", "prompt": prompt,
                     "completion": completion})  # fmt: skip
    return rows


def default_rewards(options: dict) -> list[dict]:
    """VADER's compound score of the completion."""
    return [{"name": "sentiment", "weight": 1.0, "options": {}}]
