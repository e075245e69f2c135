"""What every recipe does the same way at its edges: a missing model is one clear line, lengths
are held to the model's context, a fresh start replaces an earlier run's metrics."""

from __future__ import annotations

import pytest

from posttrain.cli import main
from posttrain.models.tiny import save_tiny
from posttrain.train.metrics import read_metrics
from tests.conftest import MICRO, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "chosen": str(i + 1), "rejected": "x",
             "answer": str(i + 1)} for i in range(40)]  # fmt: skip
    return {
        "sft": write_jsonl(root / "sft.jsonl", [{k: r[k] for k in ("prompt", "completion")} for r in rows]),
        "pairs": write_jsonl(root / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{k: r[k] for k in ("prompt", "answer")} for r in rows]),
    }  # fmt: skip


def command(recipe: str, files: dict, model: str, out) -> list[str]:
    data = {"sft": "sft", "dpo": "pairs", "rm": "pairs", "grpo": "prompts", "ppo": "prompts"}
    args = [recipe, f"model.path={model}", f"data.train={files[data[recipe]]}",
            "data.chat_template=never", f"run.out_dir={out}", "run.progress=false"]  # fmt: skip
    if recipe in ("grpo", "ppo"):
        args += ["rewards=[{name: exact_match}]", "sampling.max_new_tokens=4"]
    if recipe == "ppo":
        args.append("critic.init=policy")
    return args


@pytest.mark.parametrize("recipe", ["sft", "dpo", "rm", "grpo", "ppo"])
@pytest.mark.parametrize("path", ["/no/such/model", ""], ids=["missing", "empty"])
def test_a_missing_model_is_one_clear_line(recipe, path, files, tmp_path, capsys):
    assert main(command(recipe, files, path, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "error: model.path:" in err and "Traceback" not in err
    assert ("not set" in err) if not path else (f"{path!r} is not a Hugging Face model" in err)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A model built with 48 positions."""
    return save_tiny(tmp_path_factory.mktemp("short"), "qwen2", "tiny",
                     max_position_embeddings=48, **MICRO)  # fmt: skip


def test_lengths_are_held_to_the_models_context(short_context, tmp_path, capsys, caplog):
    """The default data.max_length (1024) is capped at the model's 48 positions: a row of 60
    tokens is refused (it trained before), and the cap is said once."""
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=", "completion": "2" * 55}] * 4)
    args = ["sft", f"model.path={short_context}", f"data.train={long}", "data.eval_fraction=0",
            "data.chat_template=never", f"run.out_dir={tmp_path / 'a'}", "run.progress=false"]  # fmt: skip
    assert main(args) == 2
    assert "longer than data.max_length=48" in capsys.readouterr().err
    assert "data.max_length=1024 is longer than the model's context" in caplog.text
    # Online: a prompt must leave room for sampling.max_new_tokens inside the context.
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1" * 40, "answer": "1"}])
    args = ["grpo", f"model.path={short_context}", f"data.train={prompts}", "data.chat_template=never",
            "rewards=[{name: exact_match}]", "sampling.max_new_tokens=16", f"run.out_dir={tmp_path / 'b'}"]  # fmt: skip
    assert main(args) == 2
    assert "40 tokens, over data.max_prompt_length=32" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["sft", "dpo", "rm"])
def test_a_fresh_start_replaces_an_earlier_runs_metrics(recipe, files, tiny_qwen2, tmp_path):
    """A run killed before its first checkpoint, then started again, logs each step once
    (it used to keep the first run's step-0 line beside the new one)."""
    args = [*command(recipe, files, str(tiny_qwen2), tmp_path / "run"), "run.max_steps=2",
            "train.batch_size=8", "train.micro_batch_size=8", "data.eval_fraction=0.2"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # no checkpoint to resume from: a fresh start
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]
