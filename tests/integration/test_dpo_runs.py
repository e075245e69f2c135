"""Whole `posttrain dpo` runs on a tiny model: held-out implicit-reward accuracy rises, every loss
runs end to end, the reference cache hits and misses, and cached, online and LoRA-disabled
references train identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.cli import main as posttrain_main
from posttrain.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from posttrain.losses import PAIR_LOSSES
from posttrain.models.tiny import save_tiny
from posttrain.recipes.dpo import DPOConfig, ReferenceConfig, run
from posttrain.tasks.arithmetic import make_split
from posttrain.train.metrics import read_metrics
from tests.conftest import MICRO, write_jsonl

pytestmark = pytest.mark.integration


def _pairs(rows: list[dict]) -> list[dict]:
    """Chosen: the right answer; rejected: the answer to the other operator (wrong, and
    learnable from the prompt: '-' problems often have negative answers, '+' ones never)."""
    out = []
    for r in rows:
        a, op, b = int(r["prompt"][:2]), r["prompt"][2], int(r["prompt"][3:5])
        wrong = str(a - b if op == "+" else a + b)
        if wrong != r["answer"]:
            out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong})
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    train, held_out = make_split(600, 60, max_operand=30, seed=0)
    root = tmp_path_factory.mktemp("pairs")
    return (
        write_jsonl(root / "train.jsonl", _pairs(train)),
        write_jsonl(root / "eval.jsonl", _pairs(held_out)),
    )


@pytest.fixture(scope="module")
def labeled(pairs, tmp_path_factory) -> tuple[Path, Path]:
    """KTO's unpaired records: each pair's chosen as desirable, rejected as undesirable."""
    root = tmp_path_factory.mktemp("labeled")
    files = []
    for path in pairs:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        unpaired = [
            {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for i, r in enumerate(rows)
            for side in (("chosen",) if i % 2 else ("rejected",))  # no prompt twice
        ]
        files.append(write_jsonl(root / path.name, unpaired))
    return files[0], files[1]


def _config(model_dir: Path | None, data, out: Path, cache: Path | None, **kw) -> DPOConfig:
    steps = dict(out_dir=str(out), max_steps=4, progress=False, resume=False)
    steps.update(kw.pop("run", {}))
    return DPOConfig(
        model=kw.pop("model", ModelConfig(path=str(model_dir))),
        data=DataConfig(train=str(data[0]), eval=str(data[1]), chat_template="never"),
        optim=OptimConfig(lr=kw.pop("lr", 3e-3)),
        train=TrainConfig(**kw.pop("train", dict(batch_size=8, micro_batch_size=4))),
        run=RunConfig(**steps),
        reference=kw.pop("reference", ReferenceConfig(cache_dir=str(cache))),
        **kw,
    )


def test_held_out_implicit_reward_accuracy_rises(tiny_qwen2, pairs, tmp_path):
    cfg = _config(
        tiny_qwen2, pairs, tmp_path / "run", tmp_path / "cache",
        train=dict(batch_size=16, micro_batch_size=16), run=dict(max_steps=40, eval_every=10),
    )  # fmt: skip
    summary = run(cfg)
    evals = [m for m in read_metrics(tmp_path / "run") if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 10, 20, 30, 40]
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert before["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval/rewards/accuracy"] >= 0.75, after  # chance: 0.5
    assert after["eval/rewards/margin"] > 0.5
    assert after["eval/loss"] < before["eval/loss"] - 0.15
    assert summary["last"]["rewards/accuracy"] >= 0.75


@pytest.mark.parametrize("loss", sorted([*PAIR_LOSSES, "kto"]))
def test_each_loss_runs_end_to_end_through_the_cli(loss, tiny_qwen2, pairs, labeled, tmp_path):
    data = labeled if loss == "kto" else pairs
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = posttrain_main(
        [
            "dpo", f"loss={loss}", f"model.path={tiny_qwen2}", f"data.train={data[0]}",
            f"data.eval={data[1]}", "data.chat_template=never", f"run.out_dir={out}",
            "run.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
            "run.progress=false", "optim.lr=3e-3", f"reference.cache_dir={cache}",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "logps/chosen", "logps/rejected"]  # fmt: skip
    for key in keys:
        assert math.isfinite(summary["last"][key]), key
        assert math.isfinite(summary["eval_after"][f"eval/{key}"]), key
    reference_free = loss in ("simpo", "orpo")
    assert summary["reference"]["mode"] == ("none" if reference_free else "cached")
    assert cache.exists() != reference_free  # SimPO and ORPO never compute a reference
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


def test_reference_cache_hits_for_same_model_and_data_and_misses_otherwise(
    tiny_qwen2, pairs, tmp_path
):
    cache = tmp_path / "cache"
    first = run(_config(tiny_qwen2, pairs, tmp_path / "a", cache))
    assert first["reference"]["cache_hit"] is False
    # another beta and learning rate: same reference numbers, so the pass is skipped
    second = run(_config(tiny_qwen2, pairs, tmp_path / "b", cache, beta=0.3, lr=1e-3))
    assert second["reference"]["cache_hit"] is True
    assert second["reference"]["cache_file"] == first["reference"]["cache_file"]
    assert len(list(cache.iterdir())) == 1
    # another model (different weights): a miss, and a second file
    other = save_tiny(tmp_path / "other", "qwen2", "tiny", seed=1, **MICRO)
    third = run(_config(other, pairs, tmp_path / "c", cache))
    assert third["reference"]["cache_hit"] is False
    # other data: a miss too
    fewer = (write_jsonl(tmp_path / "few.jsonl", _read(pairs[0])[:50]), pairs[1])
    fourth = run(_config(tiny_qwen2, fewer, tmp_path / "d", cache))
    assert fourth["reference"]["cache_hit"] is False
    assert len(list(cache.glob("*.pt"))) == 3 and not list(cache.glob(".tmp*"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_online_and_cached_references_train_identically(lora, tiny_qwen2, pairs, tmp_path):
    """Online: a frozen copy (full) or the policy with adapters disabled (LoRA); cached: one pass
    before training. Same reference numbers, so the same losses step by step."""
    model = ModelConfig(path=str(tiny_qwen2), lora=LoraConfig(enabled=lora, r=4))
    runs = {}
    for mode in ("cached", "online"):
        ref = ReferenceConfig(mode=mode, cache_dir=str(tmp_path / "cache"))
        run(_config(None, pairs, tmp_path / mode, None, model=model, reference=ref,
                    lr=1e-2, run=dict(max_steps=5)))  # fmt: skip
        runs[mode] = [m for m in read_metrics(tmp_path / mode) if "loss" in m]
    assert len(runs["online"]) == 5
    for a, b in zip(runs["cached"], runs["online"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-5)
    assert runs["online"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # it trained
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "online" / "final")
    assert not any("lora" in key for key in merged.state_dict())
