"""Load Hugging Face causal LMs for training, optionally with LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.models.swiglu import use_lean_swiglu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' keeps float32 weights: the learner autocasts to bf16 on GPU and the optimizer
    updates fp32 master weights (pure-bf16 updates lose small steps); on CPU bf16 is slower."""
    return torch.float32 if dtype == "auto" else DTYPES[dtype]


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str,
    device: torch.device,
    *,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | str = "all-linear",
) -> PreTrainedModel:
    """A causal LM on `device`, with LoRA adapters when `lora_r > 0` (only they then train)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path: no model directory at {path!r}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    ).to(device)
    model.config.use_cache = False
    return prepare_for_training(
        model, gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip


def prepare_for_training(
    model: PreTrainedModel,
    *,
    gradient_checkpointing: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target_modules: list[str] | str,
    task_type: str,
) -> PreTrainedModel:
    """Route SwiGLU MLPs through `swiglu` (half their saved activations), turn on gradient
    checkpointing and wrap in LoRA adapters (`lora_r > 0`) as asked."""
    use_lean_swiglu(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_modules,
            task_type=task_type,
        )
        model = get_peft_model(model, config)
    return model


def save_pretrained(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """Save a loadable Hugging Face model: LoRA adapters merged into a copy, weights unchanged."""
    model = getattr(model, "module", model)  # unwrap DDP
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out)
    model.config.use_cache = False
    tokenizer.save_pretrained(out)
    return out
