"""The shared learner: one optimizer step from a list of micro-batches, for every recipe.

Recipes own their loop and their loss; the learner owns what is the same everywhere: AdamW,
the schedule, gradient accumulation, DDP, clipping and mixed precision; `posttrain.train.run`
saves and restores it with the run's checkpoints.

Normalization is exact across accumulation and processes. A recipe's loss function returns a
*sum* (over tokens, sequences or pairs) and each micro-batch comes with its *weight* (how many
tokens, sequences or pairs that sum covers). The learner divides by the total weight of the whole
step over all processes, so 2 processes x 2 micro-batches give the same gradient as 1 process x 4.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from posttrain.train.distributed import Dist
from posttrain.train.schedule import lr_factor

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


def step_indices(step: int, *, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for optimizer step `step`: epochs of seeded permutations, read in order.

    A pure function of the step, so a resumed run reads exactly the data it would have read.
    """
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        take = order[offset : offset + batch_size - len(out)].tolist()
        out += take
        position += len(take)
    return out


def split_for_rank(items: Sequence, micro_batch_size: int, dist: Dist) -> list[Sequence]:
    """This process's micro-batches of one global batch (contiguous blocks, one per process)."""
    per_rank = len(items) // dist.world_size
    mine = items[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


class Learner:
    def __init__(
        self,
        model: torch.nn.Module,
        dist: Dist,
        *,
        lr: float,
        total_steps: int,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float = 1.0,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        self.dist = dist
        self.module = model
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]  # biases and norm weights
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
            eps=eps,
            # One kernel for all parameters: on CPU 12.6 vs 93 ms per step for the 25M model
            # (benchmarks/sft.py profile); CUDA and CPU both have it.
            fused=dist.device.type in ("cuda", "cpu"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s, total=total_steps, warmup=warmup_steps, kind=schedule, min_ratio=min_lr_ratio
            ),
        )
        self.model = model
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)

    def autocast(self):
        """bf16 autocast on GPU when the weights are fp32; nothing on CPU (bf16 is slow there)."""
        if self.dist.device.type == "cuda" and self.params[0].dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, micro_batches: Sequence, weights: Sequence[float], loss_fn: LossFn) -> dict:
        """Accumulate gradients over `micro_batches`, then take one optimizer step.

        `loss_fn(model, micro_batch)` returns `(loss_sum, metric_sums)`; each sum is divided by
        the step's total weight, so logged metrics are weighted means over the global batch.
        """
        total = float(self.dist.all_reduce_sum(torch.tensor(float(sum(weights)))))
        if total <= 0:
            raise ValueError("this step's batch has nothing to train on (total weight 0)")
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self.model.train()
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.dist.world_size == 1
                else self.model.no_sync()
            )
            with sync:
                with self.autocast():
                    loss_sum, metric_sums = loss_fn(self.model, micro_batch)
                (loss_sum * (self.dist.world_size / total)).backward()
            sums["loss"] += loss_sum.detach().double().cpu()
            for key, value in metric_sums.items():
                sums[key] += torch.as_tensor(value).detach().double().cpu()
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        reduced = self.dist.all_reduce_sum(torch.stack([sums[k] for k in keys])).cpu()
        metrics = {k: float(v) / total for k, v in zip(keys, reduced, strict=True)}
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    @property
    def part(self) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """What a checkpoint saves of this learner: the module, its optimizer and scheduler."""
        return self.module, self.optimizer, self.scheduler
