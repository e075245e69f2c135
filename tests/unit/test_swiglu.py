"""The lean SwiGLU MLP: transformers' numbers and gradients, half the saved activations."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from posttrain.models.loading import load_causal_lm
from posttrain.models.swiglu import swiglu, use_lean_swiglu


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_equals_transformers_mlp_in_values_and_gradients(bias):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, mlp_bias=bias)
    mlp = LlamaMLP(config)
    x = torch.randn(2, 7, 16, requires_grad=True)
    d_out = torch.randn(2, 7, 16)
    grads = []
    for forward in (mlp.forward, lambda x: swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        x.grad = None
        mlp.zero_grad()
        out = forward(x)
        out.backward(d_out)
        grads.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()])
    assert len(grads[0]) == (8 if bias else 5)
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_frozen_weights_get_no_gradient_and_the_input_still_does():
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2)
    ).requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in mlp.parameters())


def _saved_bytes(model, input_ids) -> int:
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids).logits.sum()
    return sum(n for ptr, n in sizes.items() if ptr not in params)


def test_training_models_use_it_and_save_fewer_activations(tiny_qwen2):
    """load_causal_lm routes every MLP through it: same logits, and the MLPs' four saved
    (tokens, intermediate) tensors per layer become two."""
    model = load_causal_lm(str(tiny_qwen2), torch.device("cpu"))
    plain = load_causal_lm(str(tiny_qwen2), torch.device("cpu"))
    for layer in plain.model.layers:
        del layer.mlp.forward  # back to transformers' own forward
    ids = torch.randint(0, 256, (1, 50))
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    c = model.config
    saved_per_layer = 2 * 50 * c.intermediate_size * 4  # two fp32 (tokens, intermediate) tensors
    expected = c.num_hidden_layers * saved_per_layer
    assert _saved_bytes(plain, ids) - _saved_bytes(model, ids) == expected
    assert use_lean_swiglu(model) == c.num_hidden_layers


def test_lora_wrapped_projections_fall_back_to_the_models_forward(tiny_qwen2):
    model = load_causal_lm(str(tiny_qwen2), torch.device("cpu"), lora_r=4)
    with torch.no_grad():  # LoRA starts with B = 0; make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 256, (1, 20))
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 20, model.config.hidden_size)
    base = swiglu(x, *(mlp.gate_proj.base_layer, mlp.up_proj.base_layer, mlp.down_proj.base_layer))
    assert not torch.allclose(base, type(mlp).forward(mlp, x))  # the adapters matter here
    torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))  # LoRA layers, not nn.Linear
    model(input_ids=ids).logits.sum().backward()  # trains the adapters without error
