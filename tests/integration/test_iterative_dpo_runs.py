"""Whole `posttrain iterative-dpo` runs on a micro model: rounds chain, learning, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.recipes.iterative_dpo import IterativeDPOConfig, run
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
# The trivially learnable verifier of the GRPO tests: the share of digits in the completion.
REWARD = "tests.integration.test_grpo_runs:digit_fraction"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    """Training prompts, and 16 held-out ones never trained on."""
    rows = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}="} for i in range(80)]
    root = tmp_path_factory.mktemp("iterative")
    return write_jsonl(root / "train.jsonl", rows[:64]), write_jsonl(root / "eval.jsonl", rows[64:])


def config(
    model: Path, prompts: tuple[Path, Path], out: Path, rounds: int = 2, **iterate
) -> IterativeDPOConfig:
    return IterativeDPOConfig.model_validate({
        "data": {"train": str(prompts[0]), "eval": str(prompts[1]), "eval_size": 16, "chat_template": "never"},
        "rewards": [{"name": REWARD}],
        "sampling": {"max_new_tokens": 6},
        "iterate": {"prompts_per_round": 32, "samples_per_prompt": 4, "chosen_truncated": True,
                    **iterate},
        "dpo": {"model": {"path": str(model)}, "reference": {"cache_dir": str(out / "cache")},
                "optim": {"lr": 3e-3}, "train": {"batch_size": 8}, "run": {"max_steps": 5}},
        "run": {"out_dir": str(out), "max_steps": rounds, "progress": False},
    })  # fmt: skip


def weights(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def test_rounds_chain_and_learn(tiny_qwen2, prompts, tmp_path):
    out = tmp_path / "run"
    summary = run(config(tiny_qwen2, prompts, out, eval_pairs_fraction=0.25))
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert summary["final_model"] == str(out / "round-2" / "dpo" / "final")
    # Round 2 starts from round 1's model, which is also its reference (reference: previous).
    dpo2 = yaml.safe_load((out / "round-2" / "dpo" / "config.yaml").read_text())
    assert dpo2["model"]["path"] == str(out / "round-1" / "dpo" / "final")
    assert dpo2["reference"]["model"] == ""
    assert dpo2["data"]["train"] == str(out / "round-2" / "pairs-train.jsonl")
    # Every pair's chosen answer scored higher than its rejected one under the reward.
    for k in (1, 2):
        pairs = [json.loads(x) for x in (out / f"round-{k}" / "pairs-train.jsonl").read_text().splitlines()]  # fmt: skip
        held_out = int(rounds[k - 1]["pairs"] * 0.25)  # a quarter of the pairs held out
        assert held_out >= 4 and len(pairs) + held_out == rounds[k - 1]["pairs"]
        share = lambda s: sum(c.isdigit() for c in s) / max(len(s), 1)  # noqa: E731
        assert all(share(p["chosen"]) > share(p["rejected"]) for p in pairs)
    # The policy learns what the verifier rewards: held-out greedy answers become all digits.
    assert summary["eval_before"]["eval/accuracy"] == 0.0
    assert rounds[-1]["eval/accuracy"] >= 0.5, rounds
    assert rounds[1]["sample/reward"] > rounds[0]["sample/reward"]
    # DPO's implicit-reward accuracy on each round's held-out pairs rose.
    for r in rounds:
        assert r["dpo/eval/rewards/accuracy/after"] > r["dpo/eval/rewards/accuracy/before"], r
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    assert (out / "curves.png").stat().st_size > 1000


def test_rerun_skips_done_rounds_and_matches(tiny_qwen2, prompts, tmp_path):
    whole = run(config(tiny_qwen2, prompts, tmp_path / "whole"))
    part = tmp_path / "part"
    run(config(tiny_qwen2, prompts, part, rounds=1))
    round1 = (part / "round-1" / "summary.json").stat().st_mtime_ns
    # A round-2 folder left by a killed run: redone from the same seeds.
    (part / "round-2").mkdir()
    (part / "round-2" / "pairs-train.jsonl").write_text("half written")
    resumed = run(config(tiny_qwen2, prompts, part))
    assert (part / "round-1" / "summary.json").stat().st_mtime_ns == round1  # not redone
    assert [r["pairs"] for r in resumed["rounds"]] == [r["pairs"] for r in whole["rounds"]]
    for k in (1, 2):
        name = f"round-{k}/pairs-train.jsonl"
        assert (part / name).read_text() == (tmp_path / "whole" / name).read_text()
    final_whole, final_part = weights(tmp_path / "whole" / "round-2/dpo/final"), weights(part / "round-2/dpo/final")  # fmt: skip
    assert all((final_whole[k] == final_part[k]).all() for k in final_whole)
    assert [m["step"] for m in read_metrics(part)] == [0, 1, 2]


def test_reference_initial_and_the_cli(tiny_qwen2, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tiny_qwen2, prompts, out, rounds=2, reference="initial")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["iterative-dpo", "--config", str(tmp_path / "c.yaml")]) == 0
    dpo2 = yaml.safe_load((out / "round-2" / "dpo" / "config.yaml").read_text())
    assert dpo2["reference"]["model"] == str(tiny_qwen2)
    assert dpo2["model"]["path"] == str(out / "round-1" / "dpo" / "final")


def test_no_pairs_is_a_clear_error(tiny_qwen2, prompts, tmp_path):
    # A random model never stops within 6 tokens, so nothing may be chosen.
    with pytest.raises(RuntimeError, match="round 1: 0 of 32 prompts gave a pair"):
        run(config(tiny_qwen2, prompts, tmp_path / "run", chosen_truncated=False))


def test_keys_each_round_sets_are_refused(tiny_qwen2, prompts, tmp_path, capsys):
    assert main(["iterative-dpo", "--dry-run", "dpo.data.train=pairs.jsonl"]) == 2
    assert "dpo.data.train: set by each round" in capsys.readouterr().err


def test_dpo_epochs_sizes_each_rounds_dpo_run_to_its_pairs(tiny_qwen2, prompts, tmp_path):
    out = tmp_path / "epochs"
    summary = run(config(tiny_qwen2, prompts, out, rounds=1, dpo_epochs=2))
    train_pairs = len((out / "round-1" / "pairs-train.jsonl").read_text().splitlines())
    dpo = yaml.safe_load((out / "round-1" / "dpo" / "config.yaml").read_text())
    assert dpo["run"]["max_steps"] == math.ceil(2 * train_pairs / 8)  # batch_size 8
    assert summary["rounds"][0]["pairs"] > train_pairs > 0
