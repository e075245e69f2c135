"""`posttrain demo-data DIR`: the datasets the examples read, written offline.

DIR/arithmetic/{train,eval}.jsonl     SFT demonstrations: `a+b=` / `a-b=` -> answer
                                      (examples/sft.yaml), held out by operand pair
DIR/rankings.jsonl                    K-way rankings by a hidden rule: more letter 'a' is
                                      better (examples/rm.yaml)
DIR/sentences/sft-{train,eval}.jsonl  sentences to continue (demonstrations), and their
DIR/sentences/prompts-{train,eval}.jsonl  prompts alone (examples/rlhf.yaml)
"""

from __future__ import annotations

import random
from pathlib import Path

from posttrain.files import write_jsonl_atomic
from posttrain.tasks import arithmetic, sentences


def more_a_rankings(count: int, seed: int = 0) -> list[dict]:
    """Rankings of 4 random strings over 'abcdef', best first by their count of 'a' (ties
    never kept)."""
    rng, rows = random.Random(seed), []
    while len(rows) < count:
        responses = [
            "".join(rng.choice("abcdef") for _ in range(rng.randint(6, 14))) for _ in range(4)
        ]
        if len({r.count("a") for r in responses}) == 4:
            ranked = sorted(responses, key=lambda r: -r.count("a"))
            rows.append({"prompt": "More a?", "responses": ranked})
    return rows


def write_demo_data(out: Path, seed: int = 0) -> list[Path]:
    out = Path(out)
    train, held_out = arithmetic.make_split(18000, 500, seed=seed)
    sft_train = sentences.make("train", 8000, seed)
    sft_eval = sentences.make("eval", 200, seed)
    prompts = lambda rows: [{"id": r["id"], "prompt": r["prompt"]} for r in rows]  # noqa: E731
    return [
        arithmetic.write_jsonl(train, out / "arithmetic" / "train.jsonl"),
        arithmetic.write_jsonl(held_out, out / "arithmetic" / "eval.jsonl"),
        write_jsonl_atomic(out / "rankings.jsonl", more_a_rankings(1200, seed)),
        write_jsonl_atomic(out / "sentences" / "sft-train.jsonl", sft_train),
        write_jsonl_atomic(out / "sentences" / "sft-eval.jsonl", sft_eval),
        write_jsonl_atomic(
            out / "sentences" / "prompts-train.jsonl",
            prompts(sentences.make("train", 4000, seed + 1)),
        ),
        write_jsonl_atomic(
            out / "sentences" / "prompts-eval.jsonl", prompts(sentences.make("eval", 200, seed + 1))
        ),
    ]
