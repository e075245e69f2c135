"""Each DPO-family loss teaches a tiny model the preferred behaviour, judged on its own outputs.

The task: a prompt is four random letters and ':'; the chosen answer is three random digits, the
rejected one three random letters (KTO: one of the two per prompt, labeled desirable or not).
After a whole `posttrain dpo` run, the saved model samples answers to prompts it never trained
on, and this file's own verifier counts those written in digits. posttrain's metrics (implicit
rewards, eval loss) are never read: swapping chosen and rejected where the recipe calls its
loss teaches letters instead, and these tests fail.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from posttrain.data.tokenize import prompt_ids
from posttrain.losses import PAIR_LOSSES
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.recipes.dpo import DPOConfig, ReferenceConfig, run
from posttrain.rollout import HFSampler, SamplingParams
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration

DIGITS, LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"
SAMPLES = 8  # answers sampled per held-out prompt

# What each loss runs with besides the shared settings. In a trial at the defaults, cDPO, IPO and
# hinge (beta = 0.1) reached their target margins (cDPO's optimum, IPO's 1 / (2 beta), hinge's
# 1 / beta) and SimPO (beta = 2) its margin gamma within 40 steps and stopped pushing, with
# 14-28% of held-out answers in digits (dpo, robust, kto: 72-79%). A smaller beta keeps every
# loss pushing; SimPO keeps the paper's gamma / beta = 0.5.
SETTINGS: dict[str, dict] = {
    **{loss: dict(beta=0.01) for loss in ("dpo", "cdpo", "robust", "ipo", "hinge", "kto")},
    "simpo": dict(beta=0.2, simpo_gamma=0.1),
    "orpo": {},
}


def written_in_digits(answer: str) -> bool:
    """The verifier: a non-empty answer of ASCII digits only."""
    return answer != "" and all(ch in DIGITS for ch in answer)


def digit_answer_rate(model_dir: Path, prompts: list[str]) -> float:
    """The share of answers, SAMPLES seeded samples per prompt at temperature 1 (a rate that
    moves with the whole distribution, not an argmax that a tie can flip), in digits."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), torch.device("cpu"))
    sampler = HFSampler(model, tokenizer, seed=0)
    params = SamplingParams(n=SAMPLES, max_new_tokens=4, seed=0)
    batch = sampler.generate([prompt_ids(tokenizer, p, chat=False) for p in prompts], params)
    answers = [c.text for c in batch.completions]
    return sum(map(written_in_digits, answers)) / len(answers)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """Train files (pairs, and KTO's labeled rows) and held-out prompts never trained on."""
    rng = random.Random(0)

    def word(n: int, alphabet: str) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    prompts = list(dict.fromkeys(word(4, LETTERS) + ":" for _ in range(300)))
    train, held_out = prompts[:200], prompts[200:232]
    pairs = [{"prompt": p, "chosen": word(3, DIGITS), "rejected": word(3, LETTERS)} for p in train]
    labeled = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for i, r in enumerate(pairs)
        for side in ("chosen" if i % 2 else "rejected",)  # one answer per prompt
    ]
    root = tmp_path_factory.mktemp("digits")
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "labeled": write_jsonl(root / "labeled.jsonl", labeled),
        "held_out": held_out,
    }


@pytest.fixture(scope="module")
def start_rate(tiny_qwen2, task) -> float:
    return digit_answer_rate(tiny_qwen2, task["held_out"])


def test_held_out_prompts_are_new_and_the_start_model_never_answers_in_digits(task, start_rate):
    trained = {json.loads(line)["prompt"] for line in task["pairs"].read_text().splitlines()}
    assert len(task["held_out"]) == 32 and not trained & set(task["held_out"])
    assert start_rate < 0.05, start_rate  # a random byte-level model: ~10/320 per token


@pytest.mark.parametrize("loss", sorted([*PAIR_LOSSES, "kto"]))
def test_each_loss_makes_held_out_answers_digits(loss, tiny_qwen2, task, start_rate, tmp_path):
    data = task["labeled"] if loss == "kto" else task["pairs"]
    out = tmp_path / "run"
    run(
        DPOConfig(
            loss=loss,
            model=ModelConfig(path=str(tiny_qwen2)),
            data=DataConfig(train=str(data), eval_fraction=0.0, chat_template="never"),
            optim=OptimConfig(lr=3e-3, schedule="constant"),
            train=TrainConfig(batch_size=16, micro_batch_size=16),
            run=RunConfig(out_dir=str(out), max_steps=40, progress=False, resume=False),
            reference=ReferenceConfig(cache_dir=str(tmp_path / "cache")),
            **SETTINGS[loss],
        )
    )
    after = digit_answer_rate(out / "final", task["held_out"])
    # Measured 0.82-0.94 (start: 0.004); 0.0 with chosen and rejected swapped in the recipe.
    assert after >= start_rate + 0.5, f"{loss}: digit answers {start_rate:.1%} -> {after:.1%}"
