"""Sampler attention for models that use PyTorch SDPA: grouped query heads under a mask.

Transformers' `sdpa_attention_forward` copies the key/value heads up to the query heads
(`repeat_kv`) whenever an attention mask is given, because CUDA's fused kernels do not take a
mask together with `enable_gqa`. The sampler always has a mask when prompts are ragged (left
padding), so every decode step would copy the whole cache of every layer. On CPU, PyTorch's
SDPA takes `enable_gqa=True` together with a boolean mask and attends the grouped heads in
place (measured: see docs/sampler.md). This function is registered under its own name and
swapped in only while the sampler runs on CPU; training and CUDA (where a mask with `enable_gqa`
may fall back to the math kernel; not measured here) keep the model's own "sdpa".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GROUPED_SDPA = "posttrain_grouped_sdpa"


def grouped_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' `sdpa_attention_forward` (query (B, H, q, D), key/value
    (B, KV, k, D), boolean mask (B, 1, q, k) or None; returns (B, q, H, D)), without `repeat_kv`."""
    if kwargs.get("position_bias") is not None:  # e.g. relative-position models: HF's path
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)


@contextmanager
def sampling_attention(model: torch.nn.Module) -> Iterator[None]:
    """While active, a CPU model on "sdpa" attends with `grouped_sdpa_forward`.

    The sampler passes ready 4D masks, which transformers forwards untouched to whichever
    function is active; masks are therefore built the same way with or without the swap.
    """
    # The decoder's own config: the one its attention modules read. Set the internal attribute,
    # since the public setter would also overwrite other sub-models' choices (e.g. a vision tower).
    config = model.config.get_text_config(decoder=True)
    on_cpu = next(model.parameters()).device.type == "cpu"
    original = config._attn_implementation
    if original != "sdpa" or not on_cpu:
        yield
        return
    config._attn_implementation_internal = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation_internal = original
