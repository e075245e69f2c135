"""Atomic, exactly resumable checkpoints.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding the trainable weights
(safetensors), the optimizer and scheduler state, the step (from which the data position
follows), and each process's random-number-generator states. It is written under a temporary
name and renamed into place, so a directory named `step-*` is always complete: a run killed
mid-write leaves only a `.tmp-*` directory, which the next start removes. Single files (cached
reference log-probs, round summaries) go through `write_atomic`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.train.distributed import Dist

PREFIX = "step-"


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace the file `path` with what `write(f)` writes to a binary file: a
    concurrent reader sees the old file or the whole new one, and a killed write leaves only a
    `.tmp-*` file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def remove_partial(root: Path) -> None:
    """Delete what a killed write left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted one under its real name: rename
    it to a `.tmp-` name first (atomic), which `remove_partial` cleans up if we die here."""
    doomed = checkpoint.with_name(f".tmp-old-{checkpoint.name}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    dist: Dist,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; every process calls this (each saves its RNG)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    if dist.is_main:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "world_size": dist.world_size, **(extra or {})})
        )
    dist.barrier()
    if dist.is_main:
        _fsync_tree(tmp)
        if final.exists():
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            _discard(old)
    dist.barrier()
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    dist: Dist,
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its state.json (with 'step')."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != dist.world_size:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes; this run has "
            f"{dist.world_size}. Resume with the same number of processes."
        )
    weights = load_file(path / "trainable.safetensors", device=str(dist.device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    saved = torch.load(path / "optimizer.pt", map_location=dist.device, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(path / f"rng-rank{dist.rank}.pt", weights_only=False))
    return state
