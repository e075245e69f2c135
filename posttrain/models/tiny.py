"""Deterministic tiny causal LMs and a byte-level tokenizer, built offline.

Tests, examples and the quickstart use these instead of downloading a model. The tokenizer maps
every byte to one token (so any ASCII, indeed any UTF-8, text round-trips exactly), adds ChatML
special tokens, and carries a ChatML chat template like Qwen2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

Arch = Literal["qwen2", "llama"]
Size = Literal["tiny", "small"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_ID = 258  # <|im_end|>: ends every assistant turn, so generation stops there
PAD_ID = 259

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# tiny: overhead-bound on a 2-core CPU (~3M non-embedding parameters);
# small: compute-bound there (~25M), the shape the benchmarks report.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens, then the ChatML specials (ids 256..259)."""
    byte_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = byte_pre
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)  # fixed ids 256..259, in this order
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    arch: Arch = "qwen2",
    size: Size = "tiny",
    seed: int = 0,
    vocab_size: int | None = None,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM, identical for identical arguments."""
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    tokenizer_vocab = 256 + len(SPECIAL_TOKENS)
    shape = dict(SIZES[size])
    shape.update(overrides)
    common = dict(
        vocab_size=vocab_size or 320,  # a multiple of 64 above the 260 tokenizer ids
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attn_implementation="sdpa",
    )
    common.update(shape)
    if common["vocab_size"] < tokenizer_vocab:
        raise ValueError(f"vocab_size must be at least {tokenizer_vocab}")
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def save_tiny(
    out: str | Path, arch: Arch = "qwen2", size: Size = "tiny", seed: int = 0, **overrides
) -> Path:
    """Build the tokenizer and model and save both in Hugging Face format under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_model(arch, size, seed, **overrides).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
