"""Whole `posttrain grpo` runs on a micro model: learning, exact resume, the reference, each algo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.recipes import grpo, grpo_config
from posttrain.rewards.base import RewardOutput
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
DIGITS = set("0123456789")


def digit_fraction(prompts, completions, **fields) -> RewardOutput:  # noqa: ARG001
    """A trivially learnable verifier: the fraction of the completion's characters that are
    digits (a random byte-level model starts near 10/320 per token)."""
    return RewardOutput([sum(ch in DIGITS for ch in c) / max(len(c), 1) for c in completions])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}=", "answer": str(i + i % 7)} for i in range(64)]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", rows)


def config(model: Path, prompts: Path, out: Path, **overrides) -> grpo_config.GRPOConfig:
    base = {
        "model": {"path": str(model)},
        "data": {
            "train": str(prompts),
            "eval": str(prompts),
            "eval_size": 16,
            "chat_template": "never",
        },  # fmt: skip
        "rewards": [{"name": "tests.integration.test_grpo_runs:digit_fraction", "weight": 1.0}],
        "sampling": {"max_new_tokens": 6},
        "grpo": {"group_size": 4, "prompts_per_step": 4, "micro_batch_size": 8},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "run": {"out_dir": str(out), "max_steps": 4, "eval_every": 0, "progress": False},
    }
    for dotted, value in overrides.items():  # section__key=value, or a top-level key
        section, _, key = dotted.partition("__")
        if key:
            base[section][key] = value
        else:
            base[section] = value
    return grpo_config.GRPOConfig.model_validate(base)


def test_short_run_raises_reward(tiny_qwen2, prompts, tmp_path):
    cfg = config(tiny_qwen2, prompts, tmp_path / "run", algo="dr_grpo", run__max_steps=30,
                 grpo__prompts_per_step=8, grpo__group_size=8, run__eval_every=15)  # fmt: skip
    grpo.run(cfg)
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run") if "reward" in m]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, f"reward {first:.3f} -> {last:.3f}"
    run = tmp_path / "run"
    assert (run / "curves.png").stat().st_size > 1000
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 31))
    logged = read_metrics(run)[-1]
    for key in ("reward", "accuracy", "groups/zero_std_fraction", "entropy", "clip_fraction",
                "completion_length", "truncated_fraction", "time/sample_s", "time/train_s",
                "eval/accuracy", "old_logprob_max_abs_diff"):  # fmt: skip
        assert key in logged, key
    assert logged["old_logprob_max_abs_diff"] < 1e-5  # pi_old reused from the sampler


def test_resume_is_exact(tiny_qwen2, prompts, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends with the very same weights,
    metrics and samples as one that ran straight through (sampling seeds follow the step)."""
    straight = tmp_path / "straight"
    cfg = config(tiny_qwen2, prompts, straight, algo="grpo", run__save_every=2, grpo__epochs=2,
                 grpo__minibatch_size=8)  # fmt: skip
    grpo.run(cfg)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")  # as if killed after step 3: only step-2 is complete
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000002"]
    grpo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": str(resumed)})}))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def without_times(records: list[dict]) -> list[dict]:
        timed = ("time", "_s", "seconds")
        return [{k: v for k, v in m.items() if not any(t in k for t in timed)} for m in records]

    assert without_times(read_metrics(straight)) == without_times(read_metrics(resumed))
    assert (straight / "samples.jsonl").read_text() == (resumed / "samples.jsonl").read_text()


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_rollouts_learn_with_rollouts_never_staler_than_the_cap(
    max_staleness, tiny_qwen2, prompts, tmp_path
):
    """Rollouts sampled ahead by a thread, max_staleness optimizer steps behind (a step takes
    one here): each step logs its lag, never above the cap; the stale tokens get decoupled
    PPO's weights (their sampler and proximal log-probs differ); and it still learns."""
    cfg = config(tiny_qwen2, prompts, tmp_path / "run", algo="dr_grpo", run__max_steps=30,
                 grpo__prompts_per_step=8, grpo__group_size=8, grpo__max_staleness=max_staleness)  # fmt: skip
    grpo.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "run") if "reward" in m]
    lags = [m["staleness"] for m in logged]
    assert lags == [min(k, max_staleness) for k in range(30)]  # then exactly the cap
    assert all(m["sampler_logprob_gap/mean"] > 1e-4 for m in logged[1:])
    assert all(m["old_logprob_max_abs_diff"] < 1e-5 for m in logged)  # pi_prox recomputed
    rewards = [m["reward"] for m in logged]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, f"reward {first:.3f} -> {last:.3f}"


def test_staleness_is_counted_in_optimizer_steps(tiny_qwen2, prompts, tmp_path):
    # Two optimizer steps a step: a cap of 3 allows a lag of one step (2 optimizer steps).
    cfg = config(tiny_qwen2, prompts, tmp_path / "run", algo="grpo", run__max_steps=4,
                 grpo__minibatch_size=8, grpo__max_staleness=3)  # fmt: skip
    grpo.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "run") if "reward" in m]
    assert [m["optimizer_steps"] for m in logged] == [2] * 4
    assert [m["staleness"] for m in logged] == [0, 2, 2, 2]


def test_beta_zero_loads_no_reference(tiny_qwen2, prompts, tmp_path, monkeypatch):
    loads = []
    real = grpo.load_model
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))  # fmt: skip
    summary = grpo.run(config(tiny_qwen2, prompts, tmp_path / "a", algo="dapo", run__max_steps=1))
    assert summary["reference"] == "none" and len(loads) == 1
    assert "kl" not in read_metrics(tmp_path / "a")[-1]
    loads.clear()
    summary = grpo.run(config(tiny_qwen2, prompts, tmp_path / "b", algo="grpo", run__max_steps=1))
    assert summary["reference"] == "frozen copy" and len(loads) == 2
    logged = [m for m in read_metrics(tmp_path / "b") if "kl" in m][-1]
    assert 0 <= logged["kl"] < 1e-5  # the first update starts at the reference


def test_lora_reference_is_the_policy_without_adapters(tiny_qwen2, prompts, tmp_path):
    cfg = config(tiny_qwen2, prompts, tmp_path / "lora", algo="grpo", run__max_steps=3,
                 model__lora={"enabled": True, "r": 4, "alpha": 8})  # fmt: skip
    summary = grpo.run(cfg)
    assert summary["reference"] == "adapters disabled"
    kls = [m["kl"] for m in read_metrics(tmp_path / "lora") if "kl" in m]
    assert kls[0] < 1e-6 < kls[-1]  # zero-initialised adapters: KL grows as they train


def test_dynamic_sampling_drops_groups_that_do_not_vary(tiny_qwen2, prompts, tmp_path):
    # Exact match on a random model: every group scores 0 everywhere, so dynamic sampling keeps
    # none after max_sampling_rounds rounds and the step trains on nothing.
    cfg = config(tiny_qwen2, prompts, tmp_path / "ds", algo="dapo", run__max_steps=1,
                 rewards=[{"name": "exact_match"}], grpo__overlong_buffer=0.0)  # fmt: skip
    grpo.run(cfg)
    logged = read_metrics(tmp_path / "ds")[-1]
    assert logged["groups/zero_std_fraction"] == 1.0
    assert logged["groups/sampled"] == 4 * cfg.grpo.max_sampling_rounds
    assert logged["groups/kept"] == 0 and logged["optimizer_steps"] == 0


@pytest.mark.parametrize("algo", sorted(grpo_config.ALGOS))
def test_each_algo_runs_and_updates(algo, tiny_qwen2, prompts, tmp_path):
    grpo.run(config(tiny_qwen2, prompts, tmp_path / algo, algo=algo, run__max_steps=2,
                    grpo__minibatch_size=8))  # fmt: skip
    logged = [m for m in read_metrics(tmp_path / algo) if "loss" in m]
    assert len(logged) == 2 and all(m["optimizer_steps"] >= 1 for m in logged)
    assert all(m["grad_norm"] > 0 for m in logged)


def test_a_monstrous_prompt_row_is_refused_as_it_is_read(tiny_qwen2, tmp_path, capsys):
    """A 3 MB prompt (the review's 50 MB grew past 11 GB) is an error naming its file, row and
    field before any tokenizing of it; so is a prompt over data.max_prompt_length tokens."""
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9" * 3_000_000, "answer": "9"}]
    path = write_jsonl(tmp_path / "huge.jsonl", rows)
    args = ["grpo", f"model.path={tiny_qwen2}", f"data.train={path}", "data.chat_template=never",
            "rewards=[{name: exact_match}]", f"run.out_dir={tmp_path / 'o'}"]  # fmt: skip
    assert main(args) == 2
    assert f"{path}: row 2: field 'prompt': 3000000 characters" in capsys.readouterr().err
    rows[1]["prompt"] = "9" * 40
    write_jsonl(path, rows)
    assert main([*args, "data.max_prompt_length=20"]) == 2
    assert (
        f"{path}: row 2: field 'prompt': 40 tokens, over data.max_prompt_length=20"
        in capsys.readouterr().err
    )
