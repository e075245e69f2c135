"""Whole `posttrain sft` runs as a user starts them: exact resume after SIGKILL, DDP, LoRA."""

from __future__ import annotations

import json
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
from transformers import AutoModelForCausalLM

from posttrain.tasks.arithmetic import make_split
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> tuple[Path, Path]:
    train, held_out = make_split(400, 40, max_operand=30, seed=0)
    root = tmp_path_factory.mktemp("arith")
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", held_out)


def sft_command(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "posttrain.cli", "sft",
        f"model.path={model}", f"data.train={data[0]}", f"data.eval={data[1]}",
        "data.chat_template=never", f"run.out_dir={out}", "run.progress=false",
        "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=3e-3", *extra,
    ]  # fmt: skip


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_resume_after_sigkill_is_exact(tiny_qwen2, arithmetic, tmp_path):
    steps = ["run.max_steps=14", "run.save_every=1", "run.keep_checkpoints=2"]
    straight = tmp_path / "straight"
    subprocess.run(sft_command(tiny_qwen2, arithmetic, straight, *steps), env=ENV, check=True)

    killed = tmp_path / "killed"
    kill_after = random.Random().randint(2, 10)
    proc = subprocess.Popen(sft_command(tiny_qwen2, arithmetic, killed, *steps), env=ENV)
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in checkpoints.glob("step-*")] if checkpoints.exists() else []
        if len(done) and max(int(p.name[5:]) for p in done) >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    for ckpt in checkpoints.glob("step-*"):  # every complete-named checkpoint is whole
        assert {"model.safetensors", "model-optimizer.pt", "state.json", "rng-rank0.pt"} <= {
            f.name for f in ckpt.iterdir()
        }
    subprocess.run(sft_command(tiny_qwen2, arithmetic, killed, *steps), env=ENV, check=True)

    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{key} differs after resuming (killed after {kill_after})"
        )
    logged = [m["step"] for m in read_metrics(killed) if "loss" in m]
    assert logged == list(range(1, 15)), "metrics.jsonl holds each step exactly once"


def test_ddp_two_processes_match_one_with_double_accumulation(tiny_qwen2, arithmetic, tmp_path):
    # Adam's eps above rounding noise, so summation order cannot flip a near-zero update.
    common = ["run.max_steps=4", "optim.eps=1e-4"]
    one = tmp_path / "one"
    subprocess.run(
        sft_command(tiny_qwen2, arithmetic, one, *common, "train.micro_batch_size=2"),
        env=ENV,
        check=True,
    )  # fmt: skip  -- 1 process x 4 micro-batches of 2
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = sft_command(tiny_qwen2, arithmetic, two, *common, "train.micro_batch_size=2")
    subprocess.run(launcher + command[1:], env=ENV, check=True)  # 2 processes x 2 micro-batches
    a, b = final_weights(one), final_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert read_metrics(one)[-2]["loss"] == pytest.approx(read_metrics(two)[-2]["loss"], rel=1e-5)


def test_lora_trains_adapters_and_saves_a_merged_model(tiny_qwen2, arithmetic, tmp_path):
    out = tmp_path / "lora"
    subprocess.run(
        sft_command(tiny_qwen2, arithmetic, out, "run.max_steps=6", "model.lora.enabled=true",
                    "model.lora.r=4", "optim.lr=1e-2"),
        env=ENV, check=True,
    )  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert not any("lora" in k for k in merged.state_dict())
    changed = [
        k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])
    ]
    assert changed and all("proj" in k for k in changed)  # only adapted linear layers moved
    summary = (out / "summary.json").read_text()
    assert "eval/loss" in json.loads(summary)["eval_after"]


def test_bad_data_is_one_clear_line_not_a_traceback(tiny_qwen2, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": 4}\n')
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "sft", f"model.path={tiny_qwen2}",
         f"data.train={bad}", f"run.out_dir={tmp_path / 'o'}"],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{bad}: row 2: field 'completion': expected a string, got int" in result.stderr
    assert "Traceback" not in result.stderr


def test_sft_lowers_held_out_loss_and_raises_accuracy(tmp_path):
    """`posttrain arithmetic`, shortened: a random tiny model fine-tuned on generated arithmetic."""
    from posttrain.recipes.arithmetic import ArithmeticConfig, run

    report = run(
        ArithmeticConfig(
            out_dir=str(tmp_path / "qs"), steps=300, max_operand=19, train_examples=700,
            eval_examples=100,
        )
    )  # fmt: skip
    assert report["eval_loss_after"] < 0.3 * report["eval_loss_before"]
    assert report["accuracy_before"] == 0.0
    assert report["accuracy_after"] >= 0.03  # 3+ of 100 unseen problems exactly right
    assert (tmp_path / "qs" / "sft" / "final" / "model.safetensors").exists()
