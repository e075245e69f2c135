"""Atomic, exactly resumable checkpoints.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding, for each trained part (the
policy, and PPO's critic beside it), its trainable weights (`<part>.safetensors`) and its
optimizer and scheduler state (`<part>-optimizer.pt`); the step (from which the data position
follows) and any recipe state (a KL controller) in `state.json`; and each process's
random-number-generator states. It is written under a temporary name and renamed into place,
so a directory named `step-*` is always complete: a run killed mid-write leaves only a `.tmp-*`
directory, which the next start removes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from posttrain.train.distributed import Dist
from posttrain.train.randomness import rng_state, set_rng_state

PREFIX = "step-"

# One trained part: (module, optimizer, scheduler).
Part = tuple[torch.nn.Module, torch.optim.Optimizer, Any]


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
    parts: Mapping[str, Part],
    dist: Dist,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; every process calls this (each saves its RNG).
    `extra` (JSON) goes into state.json beside the step."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    if dist.is_main:
        for name, (module, optimizer, scheduler) in parts.items():
            save_file(trainable_state(module), tmp / f"{name}.safetensors")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                tmp / f"{name}-optimizer.pt",
            )
        state = {"step": step, "world_size": dist.world_size, "parts": sorted(parts)}
        (tmp / "state.json").write_text(json.dumps({**state, "extra": extra or {}}))
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


def load_checkpoint(path: Path, parts: Mapping[str, Part], dist: Dist) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its state.json (`step`, `extra`)."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != dist.world_size:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes; this run has "
            f"{dist.world_size}. Resume with the same number of processes."
        )
    if state["parts"] != sorted(parts):
        raise RuntimeError(f"{path} holds parts {state['parts']}; this run trains {sorted(parts)}")
    for name, (module, optimizer, scheduler) in parts.items():
        weights = load_file(path / f"{name}.safetensors", device=str(dist.device))
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
        saved = torch.load(
            path / f"{name}-optimizer.pt", map_location=dist.device, weights_only=False
        )
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(torch.load(path / f"rng-rank{dist.rank}.pt", weights_only=False))
    return state
