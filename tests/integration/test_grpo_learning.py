"""Each GRPO algorithm teaches a tiny model a prompt-dependent behaviour, judged on its own
greedy outputs for prompts it never trained on.

The task: a prompt is four random letters and a mark, '#' asking for digits and '@' for
lowercase letters; the row's `alphabet` field holds the characters asked for, and the reward
(`in_alphabet`, this file's own verifier) is the share of the completion's characters in it.
The start model copies the mark (score 0); one that always answers in digits, or always in
letters, scores 0.5; only one that reads the mark scores near 1. Flipping the sign of the
advantages teaches the opposite of what is asked, and these tests fail.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from posttrain.data.tokenize import prompt_ids
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.recipes import grpo, grpo_config
from posttrain.rewards.base import RewardOutput
from posttrain.rollout import HFSampler, SamplingParams
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration

DIGITS, LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"
MARKS = {DIGITS: "#", LETTERS: "@"}
MAX_NEW_TOKENS = 6


def share_in_alphabet(completion: str, alphabet: str) -> float:
    """The verifier: the share of the completion's characters in `alphabet` (empty: 0)."""
    return sum(ch in alphabet for ch in completion) / max(len(completion), 1)


def in_alphabet(prompts, completions, alphabet, **fields) -> RewardOutput:  # noqa: ARG001
    """The reward: `share_in_alphabet` of each completion and its row's `alphabet` field."""
    scores = [share_in_alphabet(c, a) for c, a in zip(completions, alphabet, strict=True)]
    return RewardOutput(scores)


def held_out_score(model_dir: Path, rows: list[dict]) -> float:
    """The mean verifier score of the model's greedy completions of `rows`' prompts."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), torch.device("cpu"))
    sampler = HFSampler(model, tokenizer, seed=0)
    ids = [prompt_ids(tokenizer, r["prompt"], chat=False) for r in rows]
    batch = sampler.generate(ids, SamplingParams.greedy(max_new_tokens=MAX_NEW_TOKENS))
    scores = [
        share_in_alphabet(c.text, rows[c.prompt_index]["alphabet"]) for c in batch.completions
    ]
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A train prompt file and held-out rows never trained on, half asking for each alphabet."""
    rng = random.Random(0)
    words = list(dict.fromkeys("".join(rng.choices(LETTERS, k=4)) for _ in range(300)))
    rows = []
    for i, word in enumerate(words[:232]):
        alphabet = DIGITS if i % 2 else LETTERS
        rows.append({"prompt": word + MARKS[alphabet], "alphabet": alphabet})
    root = tmp_path_factory.mktemp("alphabets")
    return {"train": write_jsonl(root / "train.jsonl", rows[:200]), "held_out": rows[200:]}


@pytest.fixture(scope="module")
def start_score(tiny_qwen2, task) -> float:
    return held_out_score(tiny_qwen2, task["held_out"])


def test_held_out_prompts_are_new_and_the_start_model_scores_nothing(task, start_score):
    held_out = [r["prompt"] for r in task["held_out"]]
    trained = task["train"].read_text()
    assert len(held_out) == 32 and not any(f'"{p}"' in trained for p in held_out)
    assert {r["alphabet"] for r in task["held_out"]} == {DIGITS, LETTERS}
    assert start_score < 0.05, start_score  # it repeats the mark


@pytest.mark.parametrize("algo", sorted(grpo_config.ALGOS))
def test_each_algo_learns_to_read_the_mark(algo, tiny_qwen2, task, start_score, tmp_path):
    group = {"group_size": 8, "prompts_per_step": 8, "micro_batch_size": 64}
    if algo == "dapo":
        # DAPO's soft overlong penalty: within 6 tokens, stopping at once is worth more than
        # the task (-1 for a full-length answer); measuring it needs longer answers and steps.
        group["overlong_buffer"] = 0.0
    cfg = grpo_config.GRPOConfig.model_validate(
        {
            "algo": algo,
            "model": {"path": str(tiny_qwen2)},
            "data": {"train": str(task["train"]), "eval_size": 0, "chat_template": "never"},
            "rewards": [{"name": "tests.integration.test_grpo_learning:in_alphabet"}],
            "sampling": {"max_new_tokens": MAX_NEW_TOKENS},
            "grpo": group,
            "optim": {"lr": 6e-3, "schedule": "constant"},
            "run": {"out_dir": str(tmp_path / algo), "max_steps": 40, "progress": False},
        }
    )
    grpo.run(cfg)
    after = held_out_score(tmp_path / algo / "final", task["held_out"])
    # Above 0.5, the model answers each mark in its own alphabet: measured 0.99-1.0 on every
    # algo with the sampler's earlier random draws; with per-prompt streams reinforce_pp gives
    # 0.70, 1.0 and 0.94 at seeds 0, 1, 2; 0.0 with the advantages' sign flipped.
    assert after >= start_score + 0.6, f"{algo}: held-out score {start_score:.2f} -> {after:.2f}"
