"""Sampled completions of online runs: `samples.jsonl` (one row per completion shown, with its
step) and, on a terminal, a table of them."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

COLUMNS = ("prompt", "completion", "reward", "advantage", "correct", "finish")


class SampleLog:
    """Appends rows `{"step", ...}` to `path`; on resume, first drops rows of steps after
    `start_step` (the resumed run writes them again), on a fresh start (0) every row. With `console`, also prints each step's
    rows as a table (rich; above the progress bar)."""

    def __init__(self, path: Path, *, start_step: int, console: bool) -> None:
        self.path = path
        self.console = Console() if console else None
        if path.exists():
            lines = [x for x in path.read_text().splitlines() if x.strip()]
            keep = [x for x in lines if start_step > 0 and json.loads(x)["step"] <= start_step]
            path.write_text("".join(x + "\n" for x in keep))

    def write(self, step: int, rows: list[dict]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        if self.console is not None and rows:
            table = Table(title=f"step {step}: sampled completions")
            columns = [c for c in COLUMNS if c in rows[0]]
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*(str(row[c])[:200] for c in columns))
            self.console.print(table)
