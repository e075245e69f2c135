"""The start every recipe shares: process group, batch-size check, seeds, resolved config."""

from __future__ import annotations

from pathlib import Path

from posttrain.train.checkpoint import seed_all
from posttrain.train.distributed import Dist, init_distributed


def start_run(
    out_dir: str,
    config_yaml: str,
    *,
    device: str,
    seed: int,
    batch_size: int,
    micro_batch_size: int,
) -> tuple[Dist, Path]:
    """What every offline recipe does first: join the process group, check that a step's
    `batch_size` splits into micro-batches on every process, seed, and write the resolved
    config into the run directory."""
    dist = init_distributed(device)
    if batch_size % (micro_batch_size * dist.world_size):
        raise ValueError(
            f"train.batch_size={batch_size} must be a multiple of train.micro_batch_size="
            f"{micro_batch_size} x {dist.world_size} processes"
        )
    seed_all(seed)
    out = Path(out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    return dist, out
