"""The rollout engine a config picks: one factory, so a new engine slots in without touching
recipes. Each engine implements the `Sampler` protocol (`interface.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posttrain.config import SamplingConfig
from posttrain.rollout.hf_sampler import HFSampler
from posttrain.rollout.interface import Sampler, SamplingParams

# engine name -> (policy, tokenizer, seed) -> Sampler. The built-in engine samples with the
# policy module itself, so every optimizer step is visible to the next sampling call; an engine
# that holds its own copy of the weights must be handed them after each update.
ENGINES: dict[str, Callable[[torch.nn.Module, Any, int], Sampler]] = {
    "builtin": lambda policy, tokenizer, seed: HFSampler(policy, tokenizer, seed=seed),
}


def build_sampler(
    cfg: SamplingConfig, policy: torch.nn.Module, tokenizer: Any, seed: int
) -> Sampler:
    """The `cfg.engine` sampler over `policy` (unwrapped from DDP)."""
    if cfg.engine not in ENGINES:
        raise ValueError(
            f"sampling.engine: unknown engine {cfg.engine!r}; expected one of {sorted(ENGINES)}"
        )
    return ENGINES[cfg.engine](getattr(policy, "module", policy), tokenizer, seed)


def sampling_params(cfg: SamplingConfig, *, n: int = 1, seed: int | None = None) -> SamplingParams:
    """`SamplingParams` for `n` completions per prompt from the config's settings."""
    return SamplingParams(
        n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, stop=tuple(cfg.stop), seed=seed,
    )  # fmt: skip
