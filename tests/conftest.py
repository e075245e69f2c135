"""Shared fixtures: tiny models and tokenizers built in code, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.models.packed_attention import enable_packed_attention
from posttrain.models.tiny import save_tiny

# Small enough that a training step takes milliseconds, big enough to learn a toy task.
MICRO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="session", autouse=True)
def packed_attention() -> None:
    """Tests build models with `from_pretrained` directly, as a user loading their own model
    would; such a user calls this once before a packed forward (posttrain's loaders do)."""
    enable_packed_attention()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("qwen2"), "qwen2", "tiny", **MICRO)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama", "tiny", **MICRO)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
