"""Whole `posttrain grpo` and `posttrain ppo` runs on multi-turn trajectories (micro model):
learning through observations, exact resume, the metrics and samples a user reads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.recipes import grpo, ppo
from posttrain.tools import Observation
from posttrain.train.metrics import read_metrics
from tests.integration.test_grpo_runs import config as grpo_config
from tests.integration.test_ppo_runs import config as ppo_config
from tests.integration.test_ppo_runs import data  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
# Letters end turns: a random byte-level model writes one every ~6 tokens.
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(97, 123)]
ENV = {"factory": "tests.integration.test_tool_runs:Relay", "max_turns": 3, "turn_stop": LETTERS}


class Relay:
    """Answers the first turn with `<r: the prompt again>` and ends the episode at the second:
    every trajectory has an observation in the middle, paid -0.01."""

    def reset(self, row: dict) -> str:
        self.prompt, self.turns = row["prompt"], 0
        return ""

    def step(self, turn: str) -> Observation:
        self.turns += 1
        if self.turns >= 2:
            return Observation("", done=True)
        return Observation(f"<r: {self.prompt}>", done=False, reward=-0.01, calls=1)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from tests.conftest import write_jsonl

    rows = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}="} for i in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("tools") / "prompts.jsonl", rows)


def test_grpo_learns_through_observations(tiny_qwen2, prompts, tmp_path):
    """The digit share of the final turn (the turn after the observation) rises."""
    cfg = grpo_config(tiny_qwen2, prompts, tmp_path / "run", algo="dr_grpo", environment=ENV,
                      run__max_steps=25, grpo__prompts_per_step=8, grpo__group_size=8,
                      sampling__max_new_tokens=24, run__eval_every=25)  # fmt: skip
    grpo.run(cfg)
    metrics = read_metrics(tmp_path / "run")
    rewards = [m["reward"] for m in metrics if "reward" in m]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, f"reward {first:.3f} -> {last:.3f}"
    logged = metrics[-1]
    for key in ("tools/calls", "tools/turns", "tools/with_call", "tools/call_success",
                "reward/environment", "eval/tools/turns"):  # fmt: skip
        assert key in logged, key
    assert logged["reward/environment"] < 0 and logged["tools/turns"] > 1
    # pi_old is the sampler's log-probs on the policy's tokens, after observations too.
    assert max(m.get("old_logprob_max_abs_diff", 0) for m in metrics) < 1e-5
    rows = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert all("transcript" in r and "<r: " in r["transcript"] for r in rows if r["turns"] == 2)
    assert any(r["turns"] == 2 for r in rows)


def test_grpo_resume_is_exact_with_an_environment(tiny_qwen2, prompts, tmp_path):
    straight = tmp_path / "straight"
    cfg = grpo_config(tiny_qwen2, prompts, straight, algo="grpo", environment=ENV,
                      run__save_every=2, sampling__max_new_tokens=12)  # fmt: skip
    grpo.run(cfg)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints/step-00000004", ignore_errors=True)
    grpo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": str(resumed)})}))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "samples.jsonl").read_text() == (resumed / "samples.jsonl").read_text()


def test_ppo_trains_on_trajectories(tiny_qwen2, data, tmp_path):  # noqa: F811
    cfg = ppo_config(tiny_qwen2, data, tmp_path / "ppo", environment=ENV,
                     sampling={"max_new_tokens": 16}, run={"max_steps": 3})  # fmt: skip
    ppo.run(cfg)
    logged = read_metrics(tmp_path / "ppo")[-1]
    assert logged["tools/turns"] > 1 and logged["tools/calls"] > 0
    assert torch.isfinite(torch.tensor([logged["kl"], logged["explained_variance"]])).all()
