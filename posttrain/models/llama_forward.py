"""A lean forward pass for Llama-family decoders (Llama, Qwen2, Mistral), used by `HFSampler`.

The sampler's decode step on a CPU is short matmuls wrapped in transformers' per-layer module
calls, keyword plumbing and many small elementwise ops (docs/sampler.md). `LlamaFamilyForward`
computes the same function as the model's own forward, reading the same parameters in place,
with less of that wrapping:

- no module calls, output records, mask building or position bookkeeping per layer;
- RMSNorm by `torch.nn.functional.rms_norm` (HF's `LlamaRMSNorm` order of operations);
- rotary cos/sin from the model's own `rotary_emb` module, once per forward, so every
  `rope_type` transformers implements stays right;
- the residual adds, SiLU and gating in place, where HF allocates a new tensor each time;
- SDPA with grouped query heads against the caller's cache and mask;
- the final norm and lm_head on the last position only.

Decode logits equal the HF forward's bit for bit on CPU in float32 and bf16 (prefill keys and
values too; prefill hidden states within 4e-7). Tried and not kept: one q|k|v and one gate|up
matmul over concatenated weights (no faster here; the 2752-wide gate|up matmul was about 5%
slower than two 1376-wide ones, and the copies would double those weights' memory).

It covers exactly the classes `unsupported_reason` accepts; every other model runs its own
forward, so "any causal LM" stays true.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

# model_type -> module and class-name prefix of its transformers implementation. Mistral is
# Llama without projection biases, plus a sliding window the caller checks against the length.
_FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


def _family_classes(model_type: str) -> dict[str, type] | None:
    prefix = _FAMILIES.get(model_type)
    if prefix is None:
        return None
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    names = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm")
    return {name: getattr(module, prefix + name) for name in names}


def _has_hooks(module: nn.Module, harmless: set[int]) -> bool:
    # The lean forward does not call the modules, so hooks on them (a user's probe, accelerate's
    # device placement `_hf_hook`) would be skipped silently: such models take the HF path.
    # `harmless`: ids of the hooks transformers' `enable_input_require_grads` puts on the input
    # embeddings (with gradient checkpointing), which only mark the output as requiring grad:
    # nothing to skip while sampling under `torch.inference_mode`.
    return bool(
        set(module._forward_hooks) - harmless
        or module._forward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None
    )


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `LlamaFamilyForward` cannot stand in for `model`'s forward, or None if it can.

    It can when the model is exactly a transformers Llama / Qwen2 / Mistral causal LM (not a
    subclass, not wrapped by PEFT, whose LoRA layers replace the `nn.Linear` projections), on
    "sdpa" attention (eager models keep their own attention kernel so that sampling computes
    what their training forward computes), with all weights on one device in one dtype, and no
    forward hooks anywhere (they would not run). Window lengths are the caller's to check.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    classes = _family_classes(model_type) if isinstance(model_type, str) else None
    if classes is None or type(model) is not classes["ForCausalLM"]:
        families = ", ".join(f"{prefix}ForCausalLM" for prefix in _FAMILIES.values())
        return f"{type(model).__name__} is not exactly one of {families}"
    if config.hidden_act not in ("silu", "swish"):
        return f"hidden_act {config.hidden_act!r} is not silu"
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r} is not 'sdpa'"
    if torch.nn.modules.module._global_forward_hooks or (
        torch.nn.modules.module._global_forward_pre_hooks
    ):
        return "global module forward hooks are registered"
    parameters = list(model.parameters())
    if len({(p.device, p.dtype) for p in parameters}) != 1 or parameters[0].is_meta:
        return "the weights are spread over several devices or dtypes, or not loaded"
    decoder = model.model
    layers = list(getattr(decoder, "layers", []))
    if len(layers) != config.num_hidden_layers:
        return "the model holds a different number of layers than config.num_hidden_layers"
    exact = [
        ("model", decoder, classes["Model"]),
        ("model.embed_tokens", decoder.embed_tokens, nn.Embedding),
        ("model.norm", decoder.norm, classes["RMSNorm"]),
        ("lm_head", model.lm_head, nn.Linear),
    ]
    for i, layer in enumerate(layers):
        name = f"model.layers.{i}"
        exact += [
            (name, layer, classes["DecoderLayer"]),
            (f"{name}.self_attn", layer.self_attn, classes["Attention"]),
            (f"{name}.mlp", layer.mlp, classes["MLP"]),
            (f"{name}.input_layernorm", layer.input_layernorm, classes["RMSNorm"]),
            (
                f"{name}.post_attention_layernorm",
                layer.post_attention_layernorm,
                classes["RMSNorm"],
            ),
        ]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            exact.append((f"{name}.self_attn.{proj}", getattr(layer.self_attn, proj), nn.Linear))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            exact.append((f"{name}.mlp.{proj}", getattr(layer.mlp, proj), nn.Linear))
    for name, module, expected in exact:
        if type(module) is not expected:  # e.g. PEFT's lora.Linear, a quantized Linear4bit
            found = f"{type(module).__module__}.{type(module).__qualname__}"
            return f"{name} is a {found}, not {expected.__module__}.{expected.__qualname__}"
    harmless = {
        handle.id for m in model.modules() for handle in getattr(m, "_require_grads_hooks", [])
    }
    for name, module in model.named_modules():
        if _has_hooks(module, harmless):
            return f"module {name or 'model'!r} has forward hooks, which would not run"
    return None


@dataclass
class _Layer:
    """One decoder layer's weights (views of the model's own parameters, never copies)."""

    input_norm: torch.Tensor  # (d,)
    q: tuple[torch.Tensor, torch.Tensor | None]  # (weight (H D, d), bias)
    k: tuple[torch.Tensor, torch.Tensor | None]  # (KV D, d)
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]  # (d, H D)
    post_norm: torch.Tensor
    gate: tuple[torch.Tensor, torch.Tensor | None]  # (I, d)
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]  # (d, I)


def _weights(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight, linear.bias


class LlamaFamilyForward:
    """The causal LM forward of a model that `unsupported_reason` accepts.

    It reads the model's parameters in place (no copies), so it computes with the current
    weights. Build one per `generate` call all the same: `unsupported_reason` vouches for the
    model as it is then, and adapters or hooks may be added, or modules swapped, in between.
    """

    def __init__(self, model: nn.Module) -> None:
        decoder = model.model
        attention = decoder.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.eps = decoder.norm.variance_epsilon
        self.embed = decoder.embed_tokens.weight
        self.rotary_emb = decoder.rotary_emb
        self.final_norm = decoder.norm.weight
        self.lm_head = _weights(model.lm_head)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                q=_weights(layer.self_attn.q_proj),
                k=_weights(layer.self_attn.k_proj),
                v=_weights(layer.self_attn.v_proj),
                o=_weights(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight,
                gate=_weights(layer.mlp.gate_proj),
                up=_weights(layer.mlp.up_proj),
                down=_weights(layer.mlp.down_proj),
            )
            for layer in decoder.layers
        ]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype). In float32
        the weight goes into the one call; in bf16 / fp16 it multiplies after the cast back,
        which rounds differently from scaling inside the float32 kernel."""
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, self.eps)
        return weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)

    def __call__(
        self,
        input_ids_BS: torch.Tensor,
        position_ids_BS: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor:
        """Logits of the last position, (B, V), as the model's forward with `logits_to_keep=1`.

        attention_mask: boolean "may attend" (B, 1, S, keys), or None for plain causal.
        cache: each layer's new keys/values go in by `cache.update`, and attention runs over
            what it returns, as in the model's own attention modules.
        """
        batch, length = input_ids_BS.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(input_ids_BS, self.embed)  # (B, S, d)
        cos, sin = self.rotary_emb(x, position_ids_BS)  # (B, S, D) each
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        # CUDA's fused SDPA kernels do not take a mask with grouped heads, so there (as in
        # transformers' sdpa path) the key/value heads are copied up to the query heads.
        grouped = KV != H and (attention_mask is None or x.device.type == "cpu")
        causal = length > 1 and attention_mask is None
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            q = F.linear(h, *layer.q).view(batch, length, H, D).transpose(1, 2)
            k = F.linear(h, *layer.k).view(batch, length, KV, D).transpose(1, 2)
            v = F.linear(h, *layer.v).view(batch, length, KV, D).transpose(1, 2)
            keys, values = cache.update(_rotate(k, cos, sin), v, index)
            if KV != H and not grouped:
                keys = keys.repeat_interleave(H // KV, dim=1)
                values = values.repeat_interleave(H // KV, dim=1)
            attended = F.scaled_dot_product_attention(
                _rotate(q, cos, sin),
                keys,
                values,
                attn_mask=attention_mask,
                is_causal=causal,
                scale=self.scaling,
                enable_gqa=grouped,
            )  # (B, H, S, D)
            attended = attended.transpose(1, 2).reshape(batch, length, H * D)
            # In place where HF allocates: the same arithmetic with fewer large temporaries.
            x.add_(F.linear(attended, *layer.o))
            h = self._norm(x, layer.post_norm)
            gated = F.silu(F.linear(h, *layer.gate), inplace=True).mul_(F.linear(h, *layer.up))
            x.add_(F.linear(gated, *layer.down))
        return F.linear(self._norm(x[:, -1], self.final_norm), *self.lm_head)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF's `apply_rotary_pos_emb`: x cos + rotate_half(x) sin, where
    rotate_half(x) = (-x2, x1) for the two halves of the head dimension."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1).mul_(sin)
    return (x * cos).add_(rotated)
