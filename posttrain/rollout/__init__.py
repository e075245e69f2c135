"""Rollout: turn prompt token ids into sampled completions with their logprobs.

Public API (everything a recipe needs; nothing else in posttrain calls `model.generate`):

    SamplingParams(n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   stop_token_ids=(), stop=(), ignore_eos=False, seed=None)
    SamplingParams.greedy(max_new_tokens=256, **fields) -> SamplingParams   # temperature 0
    Sampler                       protocol: generate(prompt_ids, params) -> RolloutBatch
    HFSampler(model, tokenizer=None, *, eos_token_ids=None, seed=0)   the built-in engine
    build_sampler(sampling_config, policy, tokenizer, seed)   the engine a config names (ENGINES)
    sampling_params(sampling_config, n=1, seed=None) -> SamplingParams
    EnvironmentSampler(sampler, tokenizer, make_env, max_turns=4, turn_stop=(), chat=False)
                                  multi-turn trajectories against an environment (multiturn.py)
    tool_schemas(environment_config) -> list[dict] | None   the tools a chat template lists
    RolloutBatch(prompt_ids, completions, prompt_tokens, generated_tokens,
                 prefill_seconds, decode_seconds)   .seconds, .tokens_per_second
    Completion(prompt_index, token_ids, logprobs, finish_reason, text)

`Completion.logprobs[t]` is log_softmax(logits_t / temperature)[token_t] over the whole
vocabulary, before top-k / top-p / min-p truncation (temperature 0: of the plain logits). That is
what a learner recomputes from one forward pass over prompt + completion, so the ratio
pi_theta / pi_old starts at exactly 1 when the weights did not change.

HFSampler runs any transformers causal LM on "sdpa" or "eager" attention (Llama, Qwen2 and
Mistral through a lean forward, models/llama_forward.py; the rest through their own); it preallocates
the KV cache for len(prompts) * n rows at full length (see docs/sampler.md for memory and design).

Example:

    sampler = HFSampler(policy, tokenizer, seed=0)
    batch = sampler.generate(prompt_ids, SamplingParams(n=8, max_new_tokens=128, stop=("\\n\\n",)))
    for c in batch.completions:
        prompt = batch.prompt_ids[c.prompt_index]
"""

from posttrain.rollout.engines import ENGINES, build_sampler, sampling_params, tool_schemas
from posttrain.rollout.hf_sampler import HFSampler
from posttrain.rollout.interface import (
    Completion,
    FinishReason,
    RolloutBatch,
    Sampler,
    SamplingParams,
)
from posttrain.rollout.multiturn import EnvironmentSampler

__all__ = [
    "ENGINES",
    "Completion",
    "EnvironmentSampler",
    "FinishReason",
    "HFSampler",
    "RolloutBatch",
    "Sampler",
    "SamplingParams",
    "build_sampler",
    "sampling_params",
    "tool_schemas",
]
