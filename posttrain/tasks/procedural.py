"""reasoning-gym tasks by name (Stojanovski et al. 2025, arXiv:2505.24760): 100+ procedural
generators (arithmetic chains, ciphers, graph colouring, puzzles) with their own scorers.

Rows: `{"id", "prompt", "answer", "reasoning_gym": {"dataset", "config", "index"}}`; the
`reasoning_gym` reward rebuilds the entry from that reference and scores the `<answer>` block
with the task's `score_answer`. Held-out questions are chosen by hashing the question text
(posttrain/tasks/splits.py), and each split is free of duplicate questions.
"""

from __future__ import annotations

from typing import Any

from posttrain.tasks.splits import check_split, is_held_out, split_seed

INSTRUCTION = "Give your final answer inside <answer></answer> tags."


def make(
    split: str,
    size: int,
    seed: int = 0,
    *,
    dataset: str = "chain_sum",
    config: dict[str, Any] | None = None,
    eval_fraction: float = 0.1,
    max_draws: int | None = None,
) -> list[dict]:
    """`size` distinct questions of the reasoning-gym `dataset` for `split` ("train" or
    "eval"). `config` holds the dataset's own options (e.g. `{"min_terms": 2}`);
    `max_draws` (default `50 * size + 1000`) bounds the search for distinct questions."""
    import reasoning_gym

    check_split(split, eval_fraction)
    max_draws = max_draws or 50 * size + 1000
    options = {**(config or {}), "seed": split_seed(seed, split), "size": max_draws}
    source = reasoning_gym.create_dataset(dataset, **options)
    rows: list[dict] = []
    seen: set[str] = set()
    for index in range(max_draws):
        if len(rows) == size:
            break
        entry = source[index]
        question = entry["question"]
        if question in seen or is_held_out(question, eval_fraction) != (split == "eval"):
            continue
        seen.add(question)
        rows.append(
            {
                "id": f"{dataset}-{split}-{seed}-{index}",
                "prompt": f"{question}\n\n{INSTRUCTION}",
                # None for tasks with many right answers (graph_color): only the scorer knows.
                "answer": None if entry["answer"] is None else str(entry["answer"]),
                "reasoning_gym": {"dataset": dataset, "config": options, "index": index},
            }
        )
    if len(rows) < size:
        raise ValueError(
            f"reasoning-gym {dataset!r}: found only {len(rows)} distinct {split} questions in "
            f"{max_draws} draws, asked for {size} (raise max_draws, or widen the dataset's config)"
        )
    return rows
