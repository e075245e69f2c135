"""The pipeline's evaluation and report: every stage's model on the same held-out prompts, and
report.html (plots beside it in report/, opens offline; every model-written text escaped)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.eval.curves import plot_curves
from posttrain.train.metrics import read_metrics

if TYPE_CHECKING:
    from posttrain.recipes.pipeline import Pipeline

# Models evaluated, in pipeline order: the base model and every trained stage's final model.
MODELS = ("base", "sft", "ppo", "dpo", "grpo")

# Each stage's training curves in the report (keys never logged are left out).
CURVES = {
    "sft": ("loss", "eval/loss"),
    "rm": ("loss", "accuracy", "eval/accuracy"),
    "ppo": ("score", "gold", "kl", "beta", "eval/reward", "eval/gold"),
    "dpo": ("loss", "rewards/accuracy", "rewards/margin", "eval/rewards/accuracy"),
    "grpo": ("reward", "accuracy", "eval/accuracy"),
}


def _model_dir(p: Pipeline, name: str) -> Path | None:
    if name == "base":
        base = p.finished("sft")
        path = Path(base["base"]) if base else None
    else:
        path = p.model(name)
    return path if path is not None and (path / "config.json").exists() else None


def evaluate_stages(p: Pipeline) -> dict[str, dict[str, Any]]:
    """Each model's temperature-`report.temperature` samples of the held-out prompts, scored by
    the gold rule (mean), the verifier (accuracy: the fraction it passes), the reward model
    (mean, when one was trained), and their KL to the SFT policy: the mean over samples of
    sum_t log pi(y_t) - log pi_sft(y_t), the quantity PPO's penalty bounds."""
    import torch

    from posttrain.config import PromptDataConfig
    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import uses_chat_template
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import forward_logprobs, sample
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams
    from posttrain.train.distributed import pick_device

    cfg, device = p.cfg, pick_device("auto")
    models = {name: path for name in MODELS if (path := _model_dir(p, name)) is not None}
    if not models:
        return {}
    tokenizer = load_tokenizer(str(next(iter(models.values()))))
    data = PromptDataConfig.model_validate({**p._prompt_data(), "train_size": 1})
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    _, prompts = load_prompts(
        data, tokenizer, chat=chat, max_prompt_length=data.max_prompt_length, seed=cfg.seed
    )
    gold, verifier = build_composite(p.gold_specs()), build_composite(cfg.verifier)
    proxy = None
    if (p.model("rm") / "config.json").exists():
        from posttrain.rewards.reward_model import RewardModelScorer

        proxy = RewardModelScorer(
            str(p.model("rm")), device=device, chat_template=cfg.data.chat_template
        )
    reference = load_causal_lm(str(models["sft"]), device) if "sft" in models else None
    params = SamplingParams(
        max_new_tokens=cfg.report.max_new_tokens,
        temperature=cfg.report.temperature,
        seed=cfg.seed,
    )
    results: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        model = load_causal_lm(str(path), device)
        with torch.inference_mode():
            rollouts = sample(HFSampler(model, tokenizer, seed=cfg.seed), prompts, params)
        del model
        texts, asked = [r.text for r in rollouts], [r.prompt.text for r in rollouts]
        gold_scores = gold(asked, texts).scores
        passed = verifier(asked, texts).scores
        row: dict[str, Any] = {
            "gold": _mean(gold_scores),
            "accuracy": _mean([float(s >= 1.0) for s in passed]),
            "length": _mean([len(r.token_ids) for r in rollouts]),
            "distinct_2": distinct_n(texts, 2),
        }
        if proxy is not None:
            row["proxy"] = _mean(proxy(asked, texts).scores)
        if reference is not None and cfg.report.temperature == 1.0:
            ref = forward_logprobs(reference, rollouts, 64, 1.0)
            row["kl"] = _mean(
                [
                    float((r.sampler_logprobs - lp).sum())
                    for r, lp in zip(rollouts, ref, strict=True)
                ]
            )
        row["samples"] = [
            {"prompt": r.prompt.text, "completion": r.text, "gold": float(gold_scores[i])}
            for i, r in enumerate(rollouts[: cfg.report.samples_shown])
        ]
        results[name] = row
    return results


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of `texts` (Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models"): near 0 when a policy has collapsed
    onto a few phrases."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def _mean(xs) -> float:
    xs = [float(x) for x in xs if not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else math.nan


# --- plots -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stages(evaluation: dict[str, dict], path: Path) -> Path:
    """One bar per model for the gold score, the verifier's accuracy and the reward model's
    score of its held-out samples."""
    plt = _plt()
    keys = [k for k in ("gold", "accuracy", "proxy") if any(k in r for r in evaluation.values())]
    titles = {
        "gold": "gold score (mean)",
        "accuracy": "verifier accuracy",
        "proxy": "reward-model score (mean)",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    names = list(evaluation)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [evaluation[n].get(key, math.nan) for n in names]
        ax.bar(
            names,
            values,
            color=["#999999", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)],
        )
        for x, v in enumerate(values):
            if not math.isnan(v):
                ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(titles[key])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("held-out prompts, one sample each, per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_proxy_vs_gold(p: Pipeline, evaluation: dict[str, dict], path: Path) -> Path | None:
    """Proxy (reward model) and gold score against KL to the SFT policy: PPO's held-out
    evaluations as a line, each stage's final model as a point (Gao et al. 2022)."""
    points = {n: r for n, r in evaluation.items() if "kl" in r and n != "base"}
    if not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ppo_dir = p.out / "ppo"
    if (ppo_dir / "metrics.jsonl").exists():
        metrics = read_metrics(ppo_dir)
        kl = {m["step"]: m["kl"] for m in metrics if "kl" in m}
        evals = [m for m in metrics if "eval/gold" in m]
        xs = [kl.get(m["step"], 0.0) for m in evals]
        for ax, key in zip(axes, ("eval/reward", "eval/gold"), strict=True):
            ys = [m[key] for m in evals]
            ax.plot(xs, ys, color="#dd8452", alpha=0.6, label="PPO during training")
    for name, row in points.items():
        for ax, key in zip(axes, ("proxy", "gold"), strict=True):
            if key in row:
                ax.scatter([row["kl"]], [row[key]], s=40, zorder=3)
                ax.annotate(
                    name,
                    (row["kl"], row[key]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=9,
                )
    for ax, title in zip(axes, ("proxy: reward-model score", "gold score"), strict=True):
        ax.set_xlabel("KL(policy || SFT), nats per completion")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- report.html -----------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.sample { font-family: ui-monospace, monospace; white-space: pre-wrap; }
"""


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def write_report(p: Pipeline, report: dict) -> Path:
    """report.html and its PNGs (report/*.png) in the run directory."""
    images = p.out / "report"
    images.mkdir(exist_ok=True)
    evaluation, stages = report["evaluation"], report["stages"]
    e = html.escape
    figures: list[tuple[str, Path]] = []
    if evaluation:
        figures.append(
            ("Every stage on held-out prompts", plot_stages(evaluation, images / "stages.png"))
        )
        tradeoff = plot_proxy_vs_gold(p, evaluation, images / "proxy_vs_gold.png")
        if tradeoff is not None:
            figures.append(("Proxy and gold score against KL to the SFT policy", tradeoff))
    for stage, keys in CURVES.items():
        png = plot_curves(p.out / stage, keys, images / f"{stage}.png")
        if png is not None:
            figures.append((f"{stage}: training curves", png))

    columns = {
        "gold": ("gold score", "{:.3f}"),
        "accuracy": ("verifier accuracy", "{:.1%}"),
        "proxy": ("reward-model score", "{:.3f}"),
        "kl": ("KL to SFT", "{:.2f}"),
        "length": ("tokens", "{:.1f}"),
        "distinct_2": ("distinct-2", "{:.3f}"),
    }
    heads = [head for head, _ in columns.values()]
    rows = "".join(
        f"<tr><th>{e(name)}</th>"
        + "".join(f'<td class="num">{_num(r.get(c), f)}</td>' for c, (_, f) in columns.items())
        + "</tr>"
        for name, r in evaluation.items()
    )
    stage_rows = "".join(
        f"<tr><th>{e(s)}</th><td class='num'>{_num(r.get('seconds'), '{:.0f} s')}</td>"
        f"<td>{e(', '.join(f'{k}: {_short(v)}' for k, v in r.items() if k != 'seconds'))}</td></tr>"
        for s, r in stages.items()
    )
    names = list(evaluation)
    shown = len(next(iter(evaluation.values()))["samples"]) if evaluation else 0
    sample_rows = ""
    for i in range(shown):
        prompt = evaluation[names[0]]["samples"][i]["prompt"]
        cells = "".join(
            f"<td class='sample'>{e(evaluation[n]['samples'][i]['completion'])}"
            f"<br><small>gold {_num(evaluation[n]['samples'][i]['gold'], '{:.2f}')}</small></td>"
            for n in names
        )
        sample_rows += f"<tr><td class='sample'>{e(prompt)}</td>{cells}</tr>"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain pipeline report</title>
<style>{STYLE}</style></head><body>
<h1>posttrain pipeline report</h1>
<p>Run directory <code>{e(str(p.out))}</code>, {report["seconds"]:.0f} s in this invocation.
Held-out prompts never trained on; one temperature-{p.cfg.report.temperature:g} sample per
prompt and model. Gold: the hidden rule the annotator ranked by. Verifier accuracy: the fraction
of samples the verifier passes. KL: mean log-ratio to the SFT policy per completion.
Distinct-2: distinct word pairs over all word pairs of the samples (low: collapsed).</p>
<h2>Every stage, held out</h2>
<table id="stages-table"><tr><th>model</th>{"".join(f"<th>{h}</th>" for h in heads)}</tr>{rows}</table>
{"".join(f'<h2>{e(title)}</h2><img src="report/{png.name}" alt="{e(title)}">' for title, png in figures)}
<h2>Samples, side by side</h2>
<table id="samples"><tr><th>prompt</th>{"".join(f"<th>{e(n)}</th>" for n in names)}</tr>{sample_rows}</table>
<h2>Stages run</h2>
<table><tr><th>stage</th><th>time</th><th>results</th></tr>{stage_rows}</table>
</body></html>
"""
    path = p.out / "report.html"
    path.write_text(body)
    return path


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return " → ".join(_short(v) for v in value)
    return str(value)


def print_summary(p: Pipeline, report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out prompts, every stage")
    for column in (
        "model",
        "gold score",
        "verifier accuracy",
        "RM score",
        "KL to SFT",
        "distinct-2",
    ):
        table.add_column(column, justify="right")
    for name, r in report["evaluation"].items():
        table.add_row(
            name,
            _num(r.get("gold")),
            _num(r.get("accuracy"), "{:.1%}"),
            _num(r.get("proxy")),
            _num(r.get("kl"), "{:.2f}"),
            _num(r.get("distinct_2")),
        )
    console = Console()
    console.print(table)
    console.print(f"report: {p.out / 'report.html'} ({report['seconds']:.0f} s)")
