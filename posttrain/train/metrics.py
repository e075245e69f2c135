"""Metrics: one JSON line per logged step in `metrics.jsonl`, a progress bar, optional TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLogger:
    """Writes on the main process only; other processes get a logger that does nothing."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.start = time.time()
        self._progress = self._task = self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._drop_lines_after(start_step)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._progress.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def _drop_lines_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`, forget the lines of the steps the resumed run
        redoes; a fresh start (`step` 0) forgets every line, step 0's evaluation included."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if step > 0 and line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        record["elapsed_s"] = round(time.time() - self.start, 3)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
        if self._progress is not None:
            shown = {k: v for k, v in metrics.items() if k in ("loss", "eval/loss", "lr")}
            info = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            self._progress.update(self._task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
