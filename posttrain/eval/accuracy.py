"""Task accuracy: greedy completions for held-out prompts, checked by the task's own verifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from posttrain.data.records import CompletionRecord
from posttrain.data.tokenize import prompt_ids
from posttrain.rollout import HFSampler, SamplingParams


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[CompletionRecord],
    is_correct: Callable[[str, str], bool],
    *,
    chat: bool,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> tuple[float, list[dict]]:
    """Fraction of `records` whose greedy completion `is_correct(text, record.completion)`,
    and the samples as `{prompt, completion, expected, correct}` rows."""
    sampler = HFSampler(model, tokenizer)
    params = SamplingParams.greedy(max_new_tokens=max_new_tokens)
    samples = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        ids = [prompt_ids(tokenizer, r.prompt, chat) for r in chunk]
        for completion in sampler.generate(ids, params).completions:
            record = chunk[completion.prompt_index]
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            samples.append(
                {
                    "prompt": record.prompt,
                    "completion": text,
                    "expected": record.completion,
                    "correct": is_correct(text, record.completion),
                }
            )
    return sum(s["correct"] for s in samples) / max(len(samples), 1), samples
