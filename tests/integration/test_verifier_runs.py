"""Whole runs of the verifier commands on a micro model: `posttrain rft` rounds keep only
verified answers and learn; `posttrain prm` learns step labels and scores steps as a reward;
`posttrain best-of-n` writes its table and plot; `posttrain grpo` trains on process rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.recipes.best_of_n import BestOfNConfig
from posttrain.recipes.best_of_n import run as run_best_of_n
from posttrain.recipes.prm import PRMConfig
from posttrain.recipes.prm import run as run_prm
from posttrain.recipes.rft import RFTConfig
from posttrain.recipes.rft import run as run_rft
from posttrain.rewards.base import RewardOutput
from posttrain.rewards.process import ProcessRewardScorer
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
HAS_DIGIT = "tests.integration.test_verifier_runs:has_digit"


def has_digit(prompts, completions, **fields) -> RewardOutput:  # noqa: ARG001
    """A verifier a random byte-level model passes now and then: the answer holds a digit."""
    return RewardOutput([float(any(ch.isdigit() for ch in c)) for c in completions])


def digit_count(prompts, completions, **fields) -> RewardOutput:  # noqa: ARG001
    """A scorer that agrees with `has_digit` on which answers pass, and ranks by digit count."""
    return RewardOutput([float(sum(ch.isdigit() for ch in c)) for c in completions])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    rows = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}="} for i in range(80)]
    root = tmp_path_factory.mktemp("verifier-prompts")
    return write_jsonl(root / "train.jsonl", rows[:64]), write_jsonl(root / "eval.jsonl", rows[64:])


def data(prompts) -> dict:
    return {"train": str(prompts[0]), "eval": str(prompts[1]), "eval_size": 16,
            "chat_template": "never"}  # fmt: skip


def test_rft_keeps_only_verified_answers_and_learns(tiny_qwen2, prompts, tmp_path):
    out = tmp_path / "rft"
    cfg = RFTConfig.model_validate({
        "data": data(prompts), "rewards": [{"name": HAS_DIGIT}],
        "sampling": {"max_new_tokens": 6},
        "evaluation": {"temperature": 1.0, "samples_per_prompt": 8},
        "rft": {"prompts_per_round": 64, "samples_per_prompt": 8, "keep_per_prompt": 2,
                "keep_truncated": True},
        "sft": {"model": {"path": str(tiny_qwen2)}, "optim": {"lr": 3e-3},
                "train": {"batch_size": 8}, "run": {"max_steps": 15}},
        "run": {"out_dir": str(out), "max_steps": 2, "progress": False},
    })  # fmt: skip
    summary = run_rft(cfg)
    rounds = summary["rounds"]
    for k in (1, 2):
        kept = [json.loads(x) for x in (out / f"round-{k}" / "kept.jsonl").read_text().splitlines()]
        assert len(kept) == rounds[k - 1]["kept"] > 0
        assert all(any(ch.isdigit() for ch in row["completion"]) for row in kept)
        per_prompt = {}
        for row in kept:
            per_prompt[row["prompt"]] = per_prompt.get(row["prompt"], 0) + 1
        assert max(per_prompt.values()) <= 2
    sft2 = yaml.safe_load((out / "round-2" / "sft" / "config.yaml").read_text())
    assert sft2["model"]["path"] == str(out / "round-1" / "sft" / "final")
    # Fine-tuning on verified answers makes them more likely, on held-out prompts too (sampled:
    # the micro model's greedy answer is one byte repeated).
    assert rounds[1]["sample/accuracy"] > rounds[0]["sample/accuracy"]
    assert rounds[-1]["eval/accuracy"] > summary["eval_before"]["eval/accuracy"]


def step_rows(count: int, seed: int) -> list[dict]:
    """Solutions whose steps are right ("ok") until one says "no"; from then on every label is 0
    (no answer is reachable), before it 1."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        steps = [f"{rng.choice(['ok', 'ok', 'no'])}{rng.randint(0, 9)}, " for _ in range(3)]
        steps[-1] = steps[-1].rstrip(", ")
        labels, alive = [], 1.0
        for step in steps:
            alive = 0.0 if step.startswith("no") else alive
            labels.append(alive)
        rows.append({"prompt": f"q{i}=", "steps": steps, "labels": labels})
    return rows


@pytest.fixture(scope="module")
def prm(tiny_qwen2, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prm")
    train = write_jsonl(root / "train.jsonl", step_rows(256, seed=0))
    held_out = write_jsonl(root / "eval.jsonl", step_rows(64, seed=1))
    out = root / "run"
    cfg = PRMConfig.model_validate({
        "model": {"path": str(tiny_qwen2)},
        "labels": {"train": str(train), "eval": str(held_out), "separator": ", "},
        "data": {"chat_template": "never"}, "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"batch_size": 32, "micro_batch_size": 32},
        "run": {"out_dir": str(out), "max_steps": 60, "eval_every": 30, "progress": False},
    })  # fmt: skip
    summary = run_prm(cfg)
    assert summary["eval_after"]["eval/step_accuracy"] >= 0.95, summary
    assert summary["eval_before"]["eval/step_accuracy"] < 0.8
    return out / "final"


def test_a_prm_learns_held_out_step_labels_and_scores_each_step(prm):
    scorer = ProcessRewardScorer(str(prm), device="cpu")  # separator saved with the model
    assert scorer.separator == ", "
    out = scorer(["q1=", "q2="], ["ok1, ok2, ok3", "ok1, no2, ok3"])
    (good, bad) = out.step_scores
    assert [end for end, _ in good] == [5, 10, 13]  # "ok1, " | "ok2, " | "ok3"
    assert all(p > 0.5 for _, p in good)
    assert bad[0][1] > 0.5 and bad[1][1] < 0.5 and bad[2][1] < 0.5  # wrong from step 2 on
    assert out.scores[0] > 0.5 > out.scores[1]  # 'min' aggregate


def test_prm_labels_by_monte_carlo_from_the_cli(tiny_qwen2, prompts, tmp_path, capsys):
    out = tmp_path / "prm-mc"
    code = main([
        "prm", f"model.path={tiny_qwen2}", f"data.train={prompts[0]}", f"data.eval={prompts[1]}",
        "data.train_size=16", "data.eval_size=8", "data.chat_template=never",
        f"rewards=[{{name: '{HAS_DIGIT}'}}]", "sampling.max_new_tokens=8",
        "labels.separator=' '", "labels.solutions_per_prompt=2", "labels.rollouts_per_step=2",
        "run.max_steps=2", f"run.out_dir={out}", "run.progress=false",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "labels-train.jsonl").read_text().splitlines()]
    assert rows and all(len(r["steps"]) == len(r["labels"]) for r in rows)
    for r in rows:  # the last label is the solution's own verdict
        assert r["labels"][-1] == float(any(ch.isdigit() for ch in "".join(r["steps"])))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"]["train"]["solutions"] == len(rows)
    assert (out / "final" / "config.json").exists()


def test_best_of_n_table_and_plot(tiny_qwen2, prompts, prm, tmp_path):
    out = tmp_path / "bon"
    cfg = BestOfNConfig.model_validate({
        "model": {"path": str(tiny_qwen2)}, "data": data(prompts),
        "rewards": [{"name": HAS_DIGIT}],
        "scorers": [{"name": "tests.integration.test_verifier_runs:digit_count", "label": "digits"},
                    {"name": "prm", "options": {"path": str(prm)}}],
        "n": 8, "sampling": {"max_new_tokens": 6},
        "run": {"out_dir": str(out), "progress": False},
    })  # fmt: skip
    summary = run_best_of_n(cfg)
    rows = summary["table"]
    assert [r["N"] for r in rows] == [1, 2, 4, 8]
    passes = [r["pass"] for r in rows]
    assert passes == sorted(passes) and 0 < passes[0] < passes[-1]
    for r in rows:
        # A scorer that passes exactly the verified answers picks as well as the verifier.
        assert r["digits"] == pytest.approx(r["pass"]) == pytest.approx(r["verifier"])
        assert 0 <= r["majority"] <= 1 and 0 <= r["prm"] <= r["pass"] + 1e-9
    assert rows[0]["prm"] == pytest.approx(rows[0]["pass"])  # N = 1 picks at random
    assert (out / "best_of_n.png").stat().st_size > 1000
    table = (out / "best_of_n.md").read_text()
    assert "| N | kl | pass@N | verifier@N | digits@N | prm@N | majority@N |" in table


def test_grpo_trains_on_process_rewards(tiny_qwen2, prompts, prm, tmp_path, capsys):
    out = tmp_path / "grpo"
    code = main([
        "grpo", f"model.path={tiny_qwen2}", f"data.train={prompts[0]}", "data.eval_size=0",
        "data.chat_template=never", "sampling.max_new_tokens=8",
        f"rewards=[{{name: '{HAS_DIGIT}'}}, {{name: prm, options: {{path: '{prm}', aggregate: none}}}}]",
        "grpo.process=sum", "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.beta=0",
        "run.max_steps=2", f"run.out_dir={out}", "run.progress=false",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and lines[-1]["optimizer_steps"] == 1


def test_ppo_trains_on_process_rewards(tiny_qwen2, prompts, prm, tmp_path, capsys):
    first_returns = {}
    for weight in (0.0, 0.5):
        out = tmp_path / f"ppo-{weight}"
        code = main([
            "ppo", f"model.path={tiny_qwen2}", f"data.train={prompts[0]}", "data.eval_size=0",
            "data.chat_template=never", "sampling.max_new_tokens=8", "critic.init=policy",
            f"rewards=[{{name: '{HAS_DIGIT}'}}, {{name: prm, options: {{path: '{prm}', aggregate: none}}}}]",
            f"ppo.process_weight={weight}", "ppo.prompts_per_step=8", "ppo.epochs=1",
            "run.max_steps=2", f"run.out_dir={out}", "run.progress=false",
        ])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 2
        first_returns[weight] = lines[0]["returns/mean"]
    # The same samples and critic: the step rewards (PRM probabilities > 0) raise the returns.
    assert first_returns[0.5] > first_returns[0.0] + 1e-3, first_returns
    # Without a reward that scores steps the setting refuses to run.
    code = main([
        "ppo", f"model.path={tiny_qwen2}", f"data.train={prompts[0]}", "data.eval_size=0",
        "data.chat_template=never", "sampling.max_new_tokens=8", "critic.init=policy",
        f"rewards=[{{name: '{HAS_DIGIT}'}}]", "ppo.process_weight=0.5", "ppo.prompts_per_step=8",
        "run.max_steps=1", f"run.out_dir={tmp_path / 'no-steps'}", "run.progress=false",
    ])  # fmt: skip
    assert code == 2 and "no reward scored steps" in capsys.readouterr().err
