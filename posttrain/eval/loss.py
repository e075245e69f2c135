"""Held-out negative log-likelihood: SFT's evaluation, and PPO-ptx's measure of the alignment
tax (how far RL moved the policy from its demonstrations)."""

from __future__ import annotations

import torch

from posttrain.data.packing import collate
from posttrain.data.tokenize import TokenizedExample
from posttrain.models.logprobs import nll_sum
from posttrain.train.distributed import Dist


@torch.no_grad()
def heldout_nll(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    dist: Dist,
    *,
    micro_batch_size: int,
    packed: bool,
    pad_id: int,
) -> float:
    """Mean answer-token NLL over `examples`, shared out across processes."""
    was_training = model.training
    model.eval()
    mine = examples[dist.rank :: dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), micro_batch_size):
        batch = collate(mine[i : i + micro_batch_size], packed, pad_id).to(dist.device)
        totals += torch.tensor(
            [float(nll_sum(model, batch)), batch.num_targets], dtype=torch.float64
        )
    model.train(was_training)
    loss_sum, count = dist.all_reduce_sum(totals).cpu().tolist()
    return loss_sum / max(count, 1)
