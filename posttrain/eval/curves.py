"""Training curves from a run's metrics.jsonl, drawn into a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from posttrain.train.metrics import read_metrics


def plot_curves(
    out_dir: Path, keys: Sequence[str], path: Path, x_label: str = "step"
) -> Path | None:
    """One panel per metric in `keys` against the step (named `x_label` on the axis), four to
    a row, from `out_dir/metrics.jsonl`; keys never logged are left out. Returns the PNG path, or None when
    there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir) if (Path(out_dir) / "metrics.jsonl").exists() else []
    series = {
        key: [(m["step"], m[key]) for m in records if isinstance(m.get(key), int | float)]
        for key in keys
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    columns = min(len(series), 4)
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    for ax, (key, points) in zip(axes.flat, series.items(), strict=False):
        steps, values = zip(*points, strict=True)
        if len(points) < 30:
            ax.plot(steps, values, marker="o", markersize=3)
        else:  # noisy per-step values, and their moving average over ~1/20 of the run
            ax.plot(steps, values, alpha=0.3, linewidth=0.8)
            w = max(2, len(values) // 20)
            smooth = [sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1]) for i in range(len(values))]  # fmt: skip
            ax.plot(steps, smooth, linewidth=1.8, label=f"mean of last {w}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(out_dir).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
