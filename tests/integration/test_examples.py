"""Every example config resolves, and the ones that need no earlier run start from a fresh
directory with `posttrain` commands alone (as their headers say)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def posttrain(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_config_resolves(config, tmp_path):
    command = {"rlhf.yaml": "pipeline", "tools.yaml": "grpo"}.get(
        config, config.removesuffix(".yaml").replace("_", "-")
    )
    assert "out_dir" in posttrain(
        tmp_path, command, "--config", str(EXAMPLES / config), "--dry-run"
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A directory where a user ran the two preparation commands the headers name."""
    root = tmp_path_factory.mktemp("fresh")
    posttrain(root, "tiny-model", "runs/tiny")
    posttrain(root, "tiny-model", "runs/my-model")
    posttrain(root, "demo-data", "runs/data")
    return root


@pytest.mark.parametrize("config", ["sft.yaml", "rm.yaml"])
def test_example_runs_from_the_demo_data(fresh, config):
    command = config.removesuffix(".yaml")
    posttrain(fresh, command, "--config", str(EXAMPLES / config), "run.max_steps=2",
              "run.eval_every=0", "run.progress=false")  # fmt: skip
    assert (fresh / "runs" / command / "final" / "config.json").exists()


def test_rlhf_example_starts_from_the_demo_data(fresh):
    """The pipeline on "your own" model and files: its first stages, briefly."""
    posttrain(fresh, "pipeline", "--config", str(EXAMPLES / "rlhf.yaml"), "stages=[sft,label]",
              "sft.run.max_steps=30", "annotator.prompts=48", "data.eval_size=4")  # fmt: skip
    assert (fresh / "runs" / "rlhf" / "data" / "rankings.jsonl").stat().st_size > 0
    assert (fresh / "runs" / "rlhf" / "report.html").exists()


def test_rlaif_example_runs_end_to_end(tmp_path):
    """examples/rlaif.py, shortened: every stage and the report (docs/judges.md's numbers come
    from its full run)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "rlaif.py"), "--out", str(tmp_path / "rlaif"),
         "--sft-steps", "40", "--prompts", "24", "--rm-steps", "3", "--held-out", "24"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "rlaif" / "report.json").read_text())
    for name in ("gold", "judge-both-orders", "judge-one-order"):
        assert 0.0 <= report[name]["held_out_accuracy"] <= 1.0
    assert report["gold"]["label_accuracy"] == 1.0  # the gold rule agrees with itself
    assert report["judge-both-orders"]["order_agreement"] < 1.0  # the bias shows


@pytest.mark.slow
def test_verifiers_example_runs_end_to_end(tmp_path):
    """examples/verifiers.py, shortened: every stage runs and writes its outputs
    (docs/verifiers.md's numbers come from its full run)."""
    out = tmp_path / "verifiers"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "verifiers.py"), "--out", str(out), "--label-prompts", "32",
         "--label-eval", "8", "--train-steps", "3", "--eval-prompts", "8", "--n", "4",
         "--grpo-steps", "1", "--rounds", "1", "--round-prompts", "64", "--round-steps", "2"],
        capture_output=True, text=True, timeout=1200, cwd=EXAMPLES.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"prm", "orm", "bon", "grpo", "rft", "kl", "plots"}
    assert [row["N"] for row in report["bon"]["table"]] == [1, 2, 4]
    assert set(report["grpo"]) == {"outcome", "process-sum", "process-min"}
    assert report["kl"]["start"]["kl"] == pytest.approx(0.0, abs=1e-4)
    for png in ("kl.png", "grpo.png", "rounds.png", "best-of-n/best_of_n.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_tools_example_learns_to_call_the_calculator(tmp_path):
    """examples/tools.py, RL shortened to 30 steps: held-out accuracy at T = 1 (math-verify on
    the final turn) rises with the tool and the calls with it, while the same RL without the
    tool stays at 0 (docs/tools.md's numbers come from its full run)."""
    out = tmp_path / "tools"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "tools.py"), "--out", str(out), "--steps", "30",
         "--eval-prompts", "100", "--only", "data,sft,rl"],
        capture_output=True, text=True, timeout=2400, cwd=EXAMPLES.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    tool, control = report["rl"]["calculator"], report["rl"]["no-tool"]
    before, after = tool["eval_before"], tool["eval_after"]
    assert after["eval/accuracy"] > before["eval/accuracy"] + 0.1, (before, after)
    assert after["eval/tools/with_call"] > before["eval/tools/with_call"] + 0.2
    assert control["eval_after"]["eval/accuracy"] < 0.02
