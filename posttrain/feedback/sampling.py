"""Sample rows for a project from a model directory, with the built-in sampler.

The same path `posttrain label` takes (`posttrain/recipes/label.py`): prompts read and
tokenized by `load_prompts` (chat template when the tokenizer has one), K completions each
from `HFSampler` through `sample_groups`, which keeps one of each distinct non-empty text.
A prompt left with fewer than two distinct responses has nothing to rank and is skipped (the
count is returned). A pair project samples K = 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import PromptDataConfig, SamplingConfig


def sample_rows(
    model_dir: str | Path,
    prompts_file: str | Path,
    *,
    k: int,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    limit: int = 0,
    max_prompt_length: int = 512,
    seed: int = 0,
    device: str = "auto",
) -> tuple[list[dict[str, Any]], int]:
    """`(rows {id?, prompt, responses}, prompts skipped)`: `k` responses sampled for each of
    the first `limit` (0: all) prompts of `prompts_file`."""
    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import uses_chat_template
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import sample_groups
    from posttrain.rollout import HFSampler, sampling_params
    from posttrain.train.distributed import pick_device

    if k < 2:
        raise ValueError(f"k={k}: a project needs at least 2 responses per prompt")
    tokenizer = load_tokenizer(str(model_dir))
    data = PromptDataConfig(train=str(prompts_file), train_size=limit, eval_size=0)
    chat = uses_chat_template(tokenizer, data.chat_template)
    prompts, _ = load_prompts(
        data, tokenizer, chat=chat, max_prompt_length=max_prompt_length, seed=seed
    )
    model = load_causal_lm(str(model_dir), pick_device(device)).requires_grad_(False).eval()
    sampler = HFSampler(model, tokenizer, seed=seed)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    rows, skipped = [], 0
    for prompt, rollouts in sample_groups(
        sampler, prompts, sampling_params(config, n=k, seed=seed)
    ):
        texts = [r.text for r in rollouts]
        if len(texts) < 2:
            skipped += 1
            continue
        row = {"prompt": prompt.text, "responses": texts}
        if prompt.record.id is not None:
            row["id"] = prompt.record.id
        rows.append(row)
    return rows, skipped
