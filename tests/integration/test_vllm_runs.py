"""`posttrain grpo` with `sampling.engine: vllm` (needs vLLM: its own virtual environment, see
posttrain/rollout/vllm_engine.py; skipped without it): after every step's weight sync the
engine samples with the learner's weights, so its log-probs match the learner's forward."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.models.tiny import save_tiny
from posttrain.recipes import grpo
from posttrain.train.metrics import read_metrics
from tests.integration.test_grpo_runs import config

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration
# |engine - learner| log-prob gap measured at most 6e-6 in fp32 (tests/unit/test_vllm_engine.py)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # vLLM's CPU attention needs head_dim a multiple of 32.
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return save_tiny(tmp_path_factory.mktemp("vllm-model"), "qwen2", "tiny", **shape)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from tests.conftest import write_jsonl

    rows = [{"prompt": f"{i:02d}+{i % 7:02d}="} for i in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("vllm-prompts") / "prompts.jsonl", rows)


def test_the_engine_samples_with_the_synced_weights_every_step(
    model, prompts, tmp_path, monkeypatch
):
    from posttrain.rollout.vllm_engine import VLLMSampler

    closed = []
    close = VLLMSampler.close
    monkeypatch.setattr(VLLMSampler, "close", lambda self: closed.append(close(self)))
    cfg = config(model, prompts, tmp_path / "synced", algo="grpo", run__max_steps=4,
                 sampling={"engine": "vllm", "max_new_tokens": 6})  # fmt: skip
    grpo.run(cfg)
    # The run shut its engine down. Left to the garbage collector, vLLM's shutdown (which ends
    # its process-wide groups) can run in the middle of a later engine's run in this process.
    assert len(closed) == 1
    logged = [m for m in read_metrics(tmp_path / "synced") if "reward" in m]
    assert len(logged) == 4
    # pi_old is the engine's log-probs; the learner's first forward of each step agrees.
    assert all(m["old_logprob_max_abs_diff"] < ATOL for m in logged), logged
    assert any(m["grad_norm"] > 0 for m in logged[:-1])  # the weights did move
    assert all(m["time/weight_sync_s"] > 0 for m in logged)


def test_without_the_sync_the_engine_falls_behind(model, prompts, tmp_path, monkeypatch):
    from posttrain.rollout.vllm_engine import VLLMSampler

    monkeypatch.setattr(VLLMSampler, "update_weights", lambda self, weights: None)
    cfg = config(model, prompts, tmp_path / "stale", algo="grpo", run__max_steps=4,
                 sampling={"engine": "vllm", "max_new_tokens": 6})  # fmt: skip
    grpo.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "stale") if "reward" in m]
    moved = [k for k, m in enumerate(logged) if m["grad_norm"] > 0]
    assert moved and moved[0] < 3, "no step updated the weights"
    for k, m in enumerate(logged):  # the engine keeps the start's weights
        stale = k > moved[0]
        assert (m["old_logprob_max_abs_diff"] > 100 * ATOL) == stale, (k, m)


def test_recomputed_pi_old_logs_the_engine_gap(model, prompts, tmp_path):
    cfg = config(model, prompts, tmp_path / "recompute", algo="grpo", run__max_steps=2,
                 sampling={"engine": "vllm", "max_new_tokens": 6},
                 grpo__old_logprobs="recompute")  # fmt: skip
    grpo.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "recompute") if "reward" in m]
    assert all(0 <= m["sampler_logprob_gap/max"] < ATOL for m in logged)
