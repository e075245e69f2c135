"""The whole pipeline as a user runs it (`posttrain quickstart`, shortened), its report opened in
a real headless Chromium, and a pipeline interrupted between stages and SIGKILLed inside one.

The browser: Debian's `chromium` driven by `playwright` (`make install` puts both in place where
it can). Without it these tests fail; set POSTTRAIN_ALLOW_NO_BROWSER=1 to skip them instead
where that is known and accepted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.train.metrics import read_metrics
from tests.servers import chromium

# A few steps of every stage: the wiring and the report, not the learning (the full quickstart
# and docs/pipeline.md show that).
SHORT = [
    "data.sft_size=640", "data.eval_size=16", "annotator.prompts=48", "sft.run.max_steps=30",
    "sft.run.eval_every=15", "rm.run.max_steps=4", "rm.run.eval_every=2", "ppo.run.max_steps=4",
    "ppo.run.eval_every=2", "ppo.run.save_every=1", "ppo.ppo.prompts_per_step=16",
    "ppo.ppo.minibatch_size=8", "dpo.run.max_steps=4", "dpo.run.eval_every=2",
    "grpo.run.max_steps=3", "grpo.run.eval_every=3", "grpo.grpo.prompts_per_step=4",
    "report.samples_shown=3",
]  # fmt: skip
MODELS = ("base", "sft", "ppo", "dpo", "grpo")


def posttrain(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "posttrain.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = posttrain("quickstart", f"out_dir={out}", *SHORT)
    return out, result.stdout


def test_quickstart_writes_a_report_with_every_stage(quickstart):
    out, stdout = quickstart
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["sft", "label", "rm", "ppo", "dpo", "grpo"]
    assert list(report["evaluation"]) == list(MODELS)
    for name, row in report["evaluation"].items():
        for key in ("gold", "accuracy", "proxy", "kl", "length", "distinct_2"):
            assert isinstance(row[key], float), (name, key)
        assert len(row["samples"]) == 3
    assert report["evaluation"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-3)  # to itself
    label = report["stages"]["label"]
    assert label["rankings"] > 10 and 0.5 < label["annotator_agreement"] <= 1.0
    # the files posttrain rm and posttrain dpo read, as the stages used them
    ranking = json.loads((out / "data" / "rankings.jsonl").read_text().splitlines()[0])
    assert len(ranking["responses"]) >= 2
    pair = json.loads((out / "data" / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["chosen"] != pair["rejected"]
    assert json.loads((out / "ppo" / "summary.json").read_text())["eval_after"]
    # the summary table printed at the end has a row of numbers for every model
    table = [line for line in stdout.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in table] == list(MODELS)
    assert all(len(line.split("│")) == 8 for line in table)


def test_the_report_opens_in_a_browser_with_every_plot_and_number(quickstart):
    out, _ = quickstart
    executable = chromium()
    from playwright.sync_api import sync_playwright

    pngs = sorted((out / "report").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"stages.png", "proxy_vs_gold.png", "sft.png", "rm.png", "ppo.png", "dpo.png",
            "grpo.png"} <= names  # fmt: skip
    assert all(p.stat().st_size > 5000 for p in pngs)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        page = browser.new_page()
        page.goto((out / "report.html").as_uri())
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
        )
        rows = page.locator("#stages-table tr").all_inner_texts()
        samples = page.locator("#samples tr").count()
        scripts = page.locator("script").count()
        browser.close()
    assert {src.removeprefix("report/") for src, _ in images} == names
    assert all(width > 100 for _, width in images), images  # every image loaded and decoded
    for name in MODELS:
        row = next(r for r in rows if r.split("\t")[0].strip() == name)
        numbers = row.split("\t")[1:]
        assert len(numbers) == 6 and all(n.strip() not in ("", "–") for n in numbers), row
    assert samples == 1 + 3 and scripts == 0


def test_model_text_is_escaped_in_the_report(tmp_path):
    """A completion that is HTML lands in the report as text, not markup."""
    from posttrain.eval.report import write_report
    from posttrain.recipes.pipeline import Pipeline, PipelineConfig

    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    row = {"gold": 0.5, "accuracy": 0.0, "kl": 1.0, "length": 3.0,
           "samples": [{"prompt": "<b>hi</b>", "completion": hostile, "gold": 0.0}]}  # fmt: skip
    p = Pipeline(PipelineConfig(out_dir=str(tmp_path)))
    html = write_report(p, {"stages": {}, "evaluation": {"sft": row}, "seconds": 1.0}).read_text()
    assert hostile not in html and "<b>hi</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;hi&lt;/b&gt;" in html


def test_interrupted_pipeline_skips_finished_stages_and_resumes_the_killed_one(tmp_path):
    out = tmp_path / "run"
    args = ["pipeline", f"out_dir={out}", *SHORT, "ppo.run.max_steps=12"]
    # Interrupted between stages: a first invocation runs only sft and label.
    posttrain(*args, "stages=[sft,label]")
    assert (out / "stages" / "label.json").exists() and not (out / "stages" / "rm.json").exists()
    sft_model = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    # Killed inside a stage: SIGKILL once PPO has checkpointed a few steps.
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "ppo" / "checkpoints").glob("step-*"))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before PPO checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_metrics(out / "ppo"))
    assert killed_at < 12 and not (out / "stages" / "ppo.json").exists()

    result = posttrain(*args)
    for stage in ("sft", "label", "rm"):
        assert f"{stage}: finished earlier" in result.stdout
    assert "ppo: resuming from" in result.stdout
    assert (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_model
    steps = [m["step"] for m in read_metrics(out / "ppo") if "kl" in m]
    assert steps == list(range(1, 13))  # each step once: none lost, none repeated
    assert all((out / "stages" / f"{s}.json").exists() for s in ("ppo", "dpo", "grpo"))
    # A rerun of a finished pipeline trains nothing and writes the report again.
    again = posttrain(*args)
    assert all(f"{s}: finished earlier" in again.stdout for s in ("sft", "ppo", "grpo"))
    # Other settings for a finished stage (here the reward model's): refused, naming the key.
    changed = posttrain(*args, "rm.optim.lr=0.1", check=False)
    assert changed.returncode != 0 and "'rm'" in changed.stderr and "rm.optim.lr" in changed.stderr


@pytest.mark.slow
def test_the_full_quickstart_improves_every_stage_on_held_out_prompts(tmp_path):
    """docs/pipeline.md's table: `posttrain quickstart` with every default (~4 minutes)."""
    out = tmp_path / "quickstart"
    posttrain("quickstart", f"out_dir={out}", timeout=1800)
    report = json.loads((out / "report.json").read_text())
    stages, held_out = report["stages"], report["evaluation"]
    assert 0.65 < stages["label"]["annotator_agreement"] < 0.85  # a noisy annotator
    assert stages["rm"]["eval/accuracy"][1] > 0.62  # against those noisy labels
    sft = held_out["sft"]
    for name in ("ppo", "dpo", "grpo"):
        assert held_out[name]["gold"] > sft["gold"] + 0.4, (name, held_out[name], sft)
        assert held_out[name]["accuracy"] > sft["accuracy"] + 0.3, (name, held_out[name], sft)
        assert held_out[name]["proxy"] > sft["proxy"] + 0.5, (name, held_out[name], sft)
    assert 2.0 < held_out["ppo"]["kl"] < 15.0  # adaptive beta toward 6 nats


def test_the_pipeline_annotator_is_a_pairwise_judge_in_both_orders():
    from posttrain.recipes.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="pairwise judge asked in both orders"):
        PipelineConfig.model_validate({"annotator": {"judge": {"kind": "pointwise"}}})
    with pytest.raises(ValueError, match="pairwise judge asked in both orders"):
        PipelineConfig.model_validate({"annotator": {"judge": {"both_orders": False}}})


def test_the_annotator_can_be_an_ai_judge(tmp_path):
    """RLAIF in the pipeline: a position-biased judge over HTTP ranks the responses (both
    orders), and the rankings it writes agree with the gold rule more often than not."""
    from posttrain.judges.scripted import ScriptedJudge, serve_scripted

    judge = ScriptedJudge(noise=0.2, position_bias=0.3, seed=5)
    out = tmp_path / "run"
    with serve_scripted(judge) as url:
        posttrain("pipeline", f"out_dir={out}", *SHORT, "stages=[sft,label]",
                  f"annotator.judge.base_url={url}", "annotator.judge.backoff_s=0")  # fmt: skip
    label = json.loads((out / "stages" / "label.json").read_text())
    assert label["rankings"] > 10 and label["judge"]["asked"] == judge.requests["pairwise"]
    assert 0.4 < label["order_agreement"] < 0.95 and label["annotator_agreement"] > 0.6
