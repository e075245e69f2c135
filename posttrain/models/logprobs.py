"""Forward passes that compute logits only where a target token needs them.

A causal LM's output head costs `tokens x hidden x vocab`; prompt tokens need none of it.
Packed batches pass the positions that predict a target as `logits_to_keep` (a tensor of
indices, repeated where a shared prompt's last token predicts several answers' first tokens),
so the head runs on answer tokens only. Padded batches compute the full logits and select.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from posttrain.data.packing import IGNORE, Batch
from posttrain.models.packed_attention import check_packed_support, model_inputs


def target_logits(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `(K, V)` at the K positions whose next token is a target, and those targets `(K,)`.

    Order: row-major over the batch's flattened tokens, the same order for packed and padded.
    """
    if batch.packed:
        check_packed_support(model)
        targets, predictors = batch.target_positions()
        logits = model(**model_inputs(batch), logits_to_keep=predictors).logits[0]
        return logits, batch.labels[0, targets]
    next_labels = batch.labels[:, 1:]
    is_target = next_labels != IGNORE
    logits = model(**model_inputs(batch)).logits[:, :-1]
    return logits[is_target], next_labels[is_target]


def target_logprobs(model: PreTrainedModel, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities `(K,)` of the target tokens, with logits divided by `temperature`."""
    logits, targets = target_logits(model, batch)
    logits = logits.float() / temperature
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(1)


def nll_sum(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens (a 0-d tensor)."""
    logits, targets = target_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")
