"""Whole `posttrain rm` runs: a hidden preference rule learned from rankings, the saved model
scoring as in training, two heads, LoRA, exact resume after SIGKILL, bad data."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from posttrain.config import load_config
from posttrain.data.loading import load_records
from posttrain.data.reward import RewardEncoder, tokenize_comparisons
from posttrain.models.loading import load_tokenizer
from posttrain.recipes.rm import RMConfig, run
from posttrain.rewards.reward_model import RewardModelScorer
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = "Which answer has more of the letter a?"


def _response(rng: random.Random) -> str:
    return "".join(rng.choice("abcdef") for _ in range(rng.randint(6, 14)))


def _distinct_counts(rng: random.Random, k: int) -> list[str]:
    """k responses with different counts of 'a', best (most a's) first: the hidden rule."""
    while True:
        responses = [_response(rng) for _ in range(k)]
        if len({r.count("a") for r in responses}) == k:
            return sorted(responses, key=lambda r: -r.count("a"))


@pytest.fixture(scope="module")
def letter_data(tmp_path_factory) -> tuple[Path, Path]:
    """Training rankings of K=4 and held-out pairs, both ordered by the count of 'a'."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("letters")
    train = [{"prompt": PROMPT, "responses": _distinct_counts(rng, 4)} for _ in range(300)]
    held_out = []
    for _ in range(200):
        chosen, rejected = _distinct_counts(rng, 2)
        held_out.append({"prompt": PROMPT, "chosen": chosen, "rejected": rejected})
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", held_out)


def _args(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}", f"data.train={data[0]}", f"data.eval={data[1]}",
        f"run.out_dir={out}", "run.progress=false", "train.batch_size=16",
        "train.micro_batch_size=8", "optim.lr=3e-3", *extra,
    ]  # fmt: skip


def test_hidden_rule_is_learned_and_the_saved_model_scores_as_in_training(
    tiny_qwen2, letter_data, tmp_path
):
    out = tmp_path / "rm"
    summary = run(
        load_config(RMConfig, None, _args(tiny_qwen2, letter_data, out, "run.max_steps=60"))
    )
    after = summary["eval_after"]
    print(
        "held-out accuracy", summary["eval_before"]["eval/accuracy"], "->", after["eval/accuracy"]
    )
    assert after["eval/accuracy"] >= 0.9
    assert after["eval/loss"] < 0.5 * summary["eval_before"]["eval/loss"]
    assert summary["train_pairs"] == 6 * 300  # each K=4 ranking is 6 pairs

    # The plain Hugging Face model from final/ reproduces every evaluation number by hand.
    plain = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tokenizer = load_tokenizer(str(out / "final"))
    encoder = RewardEncoder(tokenizer, decoder=True, chat=True)
    pairs = tokenize_comparisons(
        encoder, load_records(letter_data[1], "preference"), source="eval", heads=[],
        max_length=1024, max_prompt_length=512,
    )  # fmt: skip
    margins = []
    with torch.no_grad():
        for c in pairs:
            chosen, rejected = (
                float(plain(input_ids=torch.tensor([c.prompt_ids + r])).logits[0, 0])
                for r in c.response_ids
            )
            margins.append(chosen - rejected)
    assert after["eval/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert after["eval/mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    bins = [[] for _ in range(10)]
    for m in margins:
        confidence = 1 / (1 + math.exp(-abs(m)))
        bins[min(int((confidence - 0.5) * 20), 9)].append((confidence, m > 0))
    ece = sum(abs(sum(c for c, _ in b) - sum(ok for _, ok in b)) for b in bins) / len(margins)
    assert after["eval/ece"] == pytest.approx(ece, abs=1e-4)
    assert [row["pairs"] for row in summary["reliability"]] == [len(b) for b in bins]
    scorer = RewardModelScorer(str(out / "final"), device="cpu")
    prompts = [PROMPT] * 4
    records = load_records(letter_data[1], "preference")[:2]
    completions = [t for r in records for t in (r.chosen, r.rejected)]
    scores = scorer(prompts, completions).scores
    assert scores[0] - scores[1] == pytest.approx(margins[0], abs=1e-4)
    assert scores[2] - scores[3] == pytest.approx(margins[1], abs=1e-4)
    assert json.loads((out / "summary.json").read_text())["eval_after"]["eval/accuracy"] >= 0.9


def test_two_heads_learn_two_rules_from_their_columns(tiny_qwen2, tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(400):
        chosen, rejected = _distinct_counts(rng, 2)  # the row's order: more 'a' is better
        rows.append({
            "prompt": PROMPT, "chosen": chosen, "rejected": rejected,
            "few_b": [-chosen.count("b"), -rejected.count("b")],  # fewer 'b' is better
        })  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "heads"
    args = _args(tiny_qwen2, (data, ""), out, "run.max_steps=80", "data.eval_fraction=0.25")
    args += ["reward.heads=[more_a, few_b]", "reward.head_weights=[1.0, 0.0]"]
    summary = run(load_config(RMConfig, None, args))
    after = summary["eval_after"]
    print("per-head held-out accuracy", after["eval/accuracy/more_a"], after["eval/accuracy/few_b"])
    assert after["eval/accuracy/more_a"] >= 0.9 and after["eval/accuracy/few_b"] >= 0.85
    scorer = RewardModelScorer(str(out / "final"), device="cpu")
    assert scorer.heads == ["more_a", "few_b"]
    output = scorer([PROMPT] * 2, ["bbbbbbbb", "aaaaaaaa"])
    assert output.scores == output.components["more_a"]  # saved weights [1, 0]
    assert output.components["few_b"][1] > output.components["few_b"][0]


def test_lora_trains_adapters_and_the_head_and_saves_a_merged_model(
    tiny_qwen2, letter_data, tmp_path
):
    out = tmp_path / "lora"
    args = _args(tiny_qwen2, letter_data, out, "run.max_steps=4", "model.lora.enabled=true")
    summary = run(load_config(RMConfig, None, [*args, "model.lora.r=4", "optim.lr=1e-2"]))
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2).state_dict()
    assert not any("lora" in k or "modules_to_save" in k for k in merged)
    changed = {k for k, v in merged.items() if not torch.equal(v, base[k])}
    assert "score.weight" in changed and all("proj" in k or k == "score.weight" for k in changed)
    assert summary["eval_after"]["eval/pairs"] == 200


def _command(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "rm", *_args(model, data, out, *extra)]


def test_resume_after_sigkill_is_exact(tiny_qwen2, letter_data, tmp_path):
    steps = ["run.max_steps=10", "run.save_every=1", "run.keep_checkpoints=2"]
    straight = tmp_path / "straight"
    subprocess.run(_command(tiny_qwen2, letter_data, straight, *steps), env=ENV, check=True)
    killed = tmp_path / "killed"
    kill_after = random.Random().randint(2, 7)
    proc = subprocess.Popen(_command(tiny_qwen2, letter_data, killed, *steps), env=ENV)
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list(checkpoints.glob("step-*")) if checkpoints.exists() else []
        if done and max(int(p.name[5:]) for p in done) >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    subprocess.run(_command(tiny_qwen2, letter_data, killed, *steps), env=ENV, check=True)
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming at {kill_after}"
    assert [m["step"] for m in read_metrics(killed) if "loss" in m] == list(range(1, 11))


def test_bad_ranking_is_one_clear_line_not_a_traceback(tiny_qwen2, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "p", "responses": ["a", "b", "c"]}\n{"prompt": "q", "responses": ["a"]}\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "rm", f"model.path={tiny_qwen2}",
         f"data.train={bad}", f"run.out_dir={tmp_path / 'o'}"],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{bad}: row 2: field 'responses': 1 response(s); a ranking needs at least 2" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
