"""The sampler contract: what any rollout engine takes and returns.

The built-in `HFSampler` implements it; a vLLM engine can implement the same `Sampler` protocol,
so recipes (PPO, GRPO, online DPO, best-of-N, labelling, evaluation) never see which engine runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Truncations apply in vLLM's order: temperature, min-p, top-k,
    top-p (top-p acts on the distribution renormalised after the others)."""

    n: int = 1
    """Completions per prompt. The prompt is prefilled once and its cache shared by the n rows."""
    max_new_tokens: int = 256
    """Tokens generated at most per completion (finish reason `length` when reached)."""
    temperature: float = 1.0
    """Softmax temperature. 0 means greedy argmax (logprobs are then of the untempered softmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens (ties at the k-th value are kept). 0 disables it."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p. 1 disables."""
    min_p: float = 0.0
    """Keep tokens with probability >= min_p x the most likely token's. 0 disables it."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion (finish reason `stop`); the stop token is kept."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (finish reason `stop`); needs a tokenizer. The text ends
    right before the stop string; the token ids keep every sampled token up to and including the
    one that completed it."""
    ignore_eos: bool = False
    """Keep generating past the model's eos token(s) (benchmarks use it to force a length)."""
    seed: int | None = None
    """Seed this call (reproducible): prompt i's completions are drawn from a random stream of
    its own, keyed by `(seed, first_prompt + i)`, so they do not depend on the other prompts of
    the call. None uses the sampler's own generator, which advances from call to call."""
    first_prompt: int = 0
    """With a seed: the index of this call's first prompt in the seeded streams. Splitting
    prompts over calls or processes, each part passing its offset, samples what one call would."""

    def __post_init__(self) -> None:
        # Lists from YAML or callers become tuples so the params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if any(s == "" for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain the empty string")

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, **fields: object) -> SamplingParams:
        """Greedy decoding (temperature 0): argmax tokens, logprobs of the untempered softmax."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, **fields)  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion of prompt `prompt_index`."""

    prompt_index: int
    token_ids: list[int]
    """Sampled tokens, including the eos / stop token that ended the completion."""
    logprobs: list[float]
    """log_softmax(logits / temperature) of each sampled token, before top-k/top-p/min-p
    truncation: what the learner recomputes from a plain forward pass (temperature 0: of logits)."""
    finish_reason: FinishReason
    text: str | None = None
    """Decoded completion (needs a tokenizer): without the final eos / stop token, special
    tokens skipped, cut right before a stop string. Multi-turn: the last turn's."""
    mask: list[bool] | None = None
    """Multi-turn (`multiturn.py`): True where the policy wrote the token, False where an
    environment did (their logprobs are 0). None: the policy wrote every token."""
    transcript: str | None = None
    """Multi-turn: the whole trajectory's text, observations included."""
    turns: int = 1
    """Turns the policy wrote."""
    tool_calls: int = 0
    """Multi-turn: calls the environment parsed from the policy's turns ..."""
    failed_tool_calls: int = 0
    """... and of those, the ones that failed (malformed, unknown, raised, timed out)."""
    env_reward: float = 0.0
    """Multi-turn: the rewards the environment gave along the way (e.g. per-call costs)."""


@dataclass
class RolloutBatch:
    """Completions in prompt-major order: `completions[i * n + j]` is sample j of prompt i."""

    prompt_ids: list[list[int]]
    completions: list[Completion]
    prompt_tokens: int
    """Prompt tokens prefilled: each distinct prompt once, padding excluded."""
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second, prefill included."""
        return self.generated_tokens / max(self.seconds, 1e-9)


@runtime_checkable
class Sampler(Protocol):
    """Anything that turns prompt token ids into completions with logprobs."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions for each prompt (ragged lists of token ids)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM: its engine core and process-wide state). A run
        closes its samplers when it ends, so a later engine in the same process starts clean."""
        ...
