"""Load Hugging Face causal LMs for training, optionally with LoRA adapters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain.config import ModelConfig
from posttrain.models.packed_attention import enable_packed_attention
from posttrain.models.swiglu import use_lean_swiglu

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' keeps float32 weights: the learner autocasts to bf16 on GPU and the optimizer
    updates fp32 master weights (pure-bf16 updates lose small steps); on CPU bf16 is slower."""
    return torch.float32 if dtype == "auto" else DTYPES[dtype]


def model_dir(path: str, key: str = "model.path") -> str:
    """`path` if it is a Hugging Face model directory (it holds config.json); otherwise a
    FileNotFoundError naming the config key `key`, before transformers sees the path."""
    if not path:
        raise FileNotFoundError(f"{key}: not set; expected a Hugging Face model directory")
    if not (Path(path) / "config.json").is_file():
        what = "no such directory" if not Path(path).exists() else "no config.json in it"
        raise FileNotFoundError(f"{key}: {path!r} is not a Hugging Face model directory ({what})")
    return path


def context_length(path: str) -> int | None:
    """The model's context (`max_position_embeddings` of its text config), None if unstated."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def fit_to_context(length: int, path: str, key: str, reserve: int = 0) -> int:
    """`length` capped so that it plus `reserve` tokens fits the model's context; an error
    naming `key` when nothing fits."""
    context = context_length(path)
    if context is None:
        return length
    if context - reserve < 1:
        raise ValueError(
            f"{key}: the model's context (max_position_embeddings={context}) leaves no room "
            f"beside {reserve} generated tokens"
        )
    if length > context - reserve:
        beside = f" minus {reserve} generated tokens" if reserve else ""
        log.warning(
            "%s=%d is longer than the model's context (max_position_embeddings=%d%s): using %d",
            key, length, context, beside, context - reserve,
        )  # fmt: skip
    return min(length, context - reserve)


def load_tokenizer(path: str, key: str = "model.path"):
    tokenizer = AutoTokenizer.from_pretrained(model_dir(path, key), local_files_only=True)
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
    key: str = "model.path",
) -> PreTrainedModel:
    """A causal LM on `device`, with LoRA adapters when `lora_r > 0` (only they then train).
    `key`: the config key that named `path`, for the error when it is no model directory."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(path, key), dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
        local_files_only=True,
    ).to(device)  # fmt: skip
    model.config.use_cache = False
    return prepare_for_training(
        model, gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip


def load_model(
    m: ModelConfig, device: torch.device, *, trainable: bool = True, path: str | None = None
) -> PreTrainedModel:
    """The config's causal LM: trainable (gradient checkpointing and LoRA as configured), or a
    frozen copy (a reference). `path` overrides `m.path` (e.g. a separate reference model)."""
    lora = m.lora
    if not trainable:
        model = load_causal_lm(path or m.path, device, dtype=m.dtype,
                               attn_implementation=m.attn_implementation)  # fmt: skip
        return model.requires_grad_(False)
    return load_causal_lm(
        path or m.path, device, dtype=m.dtype, attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing, lora_r=lora.r if lora.enabled else 0,
        lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_target_modules=lora.target_modules,
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
    """Attend packed batches with `packed_attention`, route SwiGLU MLPs through `swiglu` (half
    their saved activations), turn on gradient checkpointing and wrap in LoRA adapters
    (`lora_r > 0`) as asked."""
    enable_packed_attention()
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
