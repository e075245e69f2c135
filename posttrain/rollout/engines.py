"""The rollout engine a config picks: one factory, so a new engine slots in without touching
recipes. Each engine implements the `Sampler` protocol (`interface.py`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from posttrain.config import EnvironmentConfig, SamplingConfig
from posttrain.rollout.hf_sampler import HFSampler
from posttrain.rollout.interface import Sampler, SamplingParams
from posttrain.rollout.multiturn import EnvironmentSampler


def vllm_sampler(policy: torch.nn.Module, tokenizer: Any, seed: int) -> Sampler:
    """vLLM's engine in this process, started from the policy's current weights; the recipe
    must call its `update_weights(policy)` after every optimizer step (`vllm_engine.py`)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "sampling.engine=vllm runs in one process for now (docs/scaling.md); start it "
            "without torchrun, or use sampling.engine=builtin"
        )
    from posttrain.rollout.vllm_engine import VLLMSampler

    return VLLMSampler(policy, tokenizer, seed=seed)


# engine name -> (policy, tokenizer, seed) -> Sampler. The built-in engine samples with the
# policy module itself, so every optimizer step is visible to the next sampling call; an engine
# that holds its own copy of the weights (vllm) must be handed them after each update.
ENGINES: dict[str, Callable[[torch.nn.Module, Any, int], Sampler]] = {
    "builtin": lambda policy, tokenizer, seed: HFSampler(policy, tokenizer, seed=seed),
    "vllm": vllm_sampler,
}


def build_sampler(
    cfg: SamplingConfig,
    policy: torch.nn.Module,
    tokenizer: Any,
    seed: int,
    environment: EnvironmentConfig | None = None,
    *,
    chat: bool = False,
) -> Sampler:
    """The `cfg.engine` sampler over `policy` (unwrapped from DDP); with an `environment`
    that has tools or a factory, wrapped to roll out multi-turn trajectories (observations
    rendered by the chat template when the prompts are, `chat`)."""
    if cfg.engine not in ENGINES:
        raise ValueError(
            f"sampling.engine: unknown engine {cfg.engine!r}; expected one of {sorted(ENGINES)}"
        )
    sampler = ENGINES[cfg.engine](getattr(policy, "module", policy), tokenizer, seed)
    if environment is None or not environment.enabled:
        return sampler
    return environment_sampler(sampler, tokenizer, environment, chat=chat)


def tool_schemas(cfg: EnvironmentConfig) -> list[dict] | None:
    """The schemas of the environment's tools, for a chat template's `tools=` (None: no tools)."""
    if not cfg.tools:
        return None
    from posttrain.tools import build_tools

    return [tool.schema() for tool in build_tools(cfg.tools)]


def environment_sampler(
    sampler: Sampler, tokenizer: Any, cfg: EnvironmentConfig, *, chat: bool = False
) -> EnvironmentSampler:
    """Multi-turn rollouts over `sampler`: a `ToolEnvironment` over `cfg.tools`, or the
    environments `cfg.factory` makes."""
    if cfg.factory:
        module, _, attr = cfg.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(
                f"environment.factory: cannot import {cfg.factory!r} (expected "
                f"'package.module:callable'): {error}"
            ) from error
        make_env, turn_stop = (lambda: factory(**cfg.options)), ()
    else:
        from posttrain.tools import CALL_CLOSE, ToolEnvironment, build_tools

        tools = build_tools(cfg.tools)
        limits = dict(
            call_cost=cfg.call_cost, timeout_s=cfg.timeout_s, max_output_chars=cfg.max_output_chars
        )
        make_env, turn_stop = (lambda: ToolEnvironment(tools, **limits)), (CALL_CLOSE,)
    if cfg.turn_stop is not None:
        turn_stop = tuple(cfg.turn_stop)
    return EnvironmentSampler(
        sampler, tokenizer, make_env, max_turns=cfg.max_turns, turn_stop=turn_stop,
        workers=cfg.workers, chat=chat,
    )  # fmt: skip


def sampling_params(cfg: SamplingConfig, *, n: int = 1, seed: int | None = None) -> SamplingParams:
    """`SamplingParams` for `n` completions per prompt from the config's settings."""
    return SamplingParams(
        n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, stop=tuple(cfg.stop), seed=seed,
    )  # fmt: skip
