"""Multi-turn rollouts: the policy writes a turn, an environment answers, the policy goes on.

    sampler = EnvironmentSampler(HFSampler(policy, tokenizer), tokenizer, make_env,
                                 max_turns=4, turn_stop=("</tool_call>",))
    batch = sampler.generate(prompt_ids, params, rows=rows)

One `Completion` is a whole trajectory after the prompt: every turn the policy wrote and every
observation the environment appended, as one token sequence with a mask that is True where the
policy wrote the token. Observation tokens are context the policy conditions on, never actions:
their log-probs are 0 here and the mask keeps them out of every loss, KL and advantage.

Each turn samples every unfinished trajectory in one call of the wrapped sampler (the first turn
shares each prompt's prefill over its n samples), then steps their environments concurrently
(tool calls wait on processes, not on the interpreter). A turn ends at eos, at a stop string of
`params.stop` or at one of `turn_stop` (where an environment expects to act, e.g. the end of a
tool call); `Environment.step` sees the turn's text and says whether the episode is over.

Budgets: `params.max_new_tokens` counts the whole trajectory (turns and observations), so a
trajectory's length means the same as a single-turn completion's; `max_turns` counts the
policy's turns. A trajectory that runs out of either ends with finish reason `length`; an
observation that would not fit is not appended.

The completion's `text` is its last turn (what rewards score: the final answer, never a tool's
output that the policy merely saw); `transcript` is the whole trajectory's text.

With `chat=True` (prompts rendered by the model's chat template) an observation is what that
template puts between the end of an assistant turn's content and the next assistant turn when
tool messages come in between (`chat_observation`): for Qwen2.5, `<|im_end|>` (unless the turn
ended on it), a user turn of `<tool_response>` blocks, and `<|im_start|>assistant`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from posttrain.rollout.interface import (
    Completion,
    FinishReason,
    RolloutBatch,
    Sampler,
    SamplingParams,
)


class Environment(Protocol):
    """What a multi-turn rollout talks to (posttrain.tools.ToolEnvironment is one)."""

    def reset(self, row: dict) -> str:
        """Start an episode on a task row (`{"prompt": text, **columns}`); returns text put
        before the first turn ("" for none)."""
        ...

    def step(self, turn: str) -> Any:
        """React to the policy's turn: an object with `text` (appended as observation tokens),
        `done`, `reward` (added to the outcome reward), `calls` and `failed_calls`."""
        ...


@dataclass
class _Trajectory:
    prompt_index: int
    prompt_ids: list[int]
    env: Environment
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    text: str = ""
    """The last turn's text."""
    last_turn: list[int] = field(default_factory=list)
    last_finish: FinishReason = "eos"
    finish_reason: FinishReason | None = None
    turns: int = 0
    calls: int = 0
    failed_calls: int = 0
    env_reward: float = 0.0

    def observe(self, token_ids: list[int]) -> None:
        self.token_ids += token_ids
        self.logprobs += [0.0] * len(token_ids)
        self.mask += [False] * len(token_ids)


class EnvironmentSampler:
    """A `Sampler` whose completions are multi-turn trajectories against an environment.

    `make_env()` builds one environment per trajectory; `rows` (one per prompt) are what
    `Environment.reset` starts from. `workers` environments step at once."""

    def __init__(
        self,
        sampler: Sampler,
        tokenizer: Any,
        make_env: Callable[[], Environment],
        *,
        max_turns: int = 4,
        turn_stop: Sequence[str] = (),
        workers: int = 16,
        chat: bool = False,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns: expected at least 1, got {max_turns}")
        self.sampler, self.tokenizer, self.make_env = sampler, tokenizer, make_env
        self.max_turns, self.turn_stop, self.workers = max_turns, tuple(turn_stop), workers
        self.chat = chat

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        rows: Sequence[dict] | None = None,
    ) -> RolloutBatch:
        rows = list(rows) if rows is not None else [{} for _ in prompt_ids]
        if len(rows) != len(prompt_ids):
            raise ValueError(f"rows: expected one per prompt ({len(prompt_ids)}), got {len(rows)}")
        began = time.perf_counter()
        trajectories = [
            _Trajectory(i, list(ids), self.make_env())
            for i, ids in enumerate(prompt_ids)
            for _ in range(params.n)
        ]
        for t in trajectories:
            t.observe(self._encode(t.env.reset(rows[t.prompt_index])))
        stop = tuple(dict.fromkeys(params.stop + self.turn_stop))
        prefill = decode = 0.0
        generated = prompt_tokens = 0
        active = trajectories
        with ThreadPoolExecutor(self.workers) as pool:
            for turn in range(self.max_turns):
                if not active:
                    break
                batch = self._sample_turn(prompt_ids, active, params, stop, turn)
                prefill += batch.prefill_seconds
                decode += batch.decode_seconds
                generated += batch.generated_tokens
                prompt_tokens += batch.prompt_tokens
                for t, c in zip(active, batch.completions, strict=True):
                    self._append_turn(t, c, params)
                stepping = [t for t in active if t.finish_reason is None]
                observations = list(pool.map(lambda t: t.env.step(self._turn_text(t)), stepping))
                for t, obs in zip(stepping, observations, strict=True):
                    self._react(t, obs, params, last_turn=turn + 1 == self.max_turns)
                active = [t for t in active if t.finish_reason is None]
        for t in trajectories:
            close = getattr(t.env, "close", None)
            if close is not None:
                close()
        completions = [
            Completion(
                prompt_index=t.prompt_index,
                token_ids=t.token_ids,
                logprobs=t.logprobs,
                finish_reason=t.finish_reason or "length",
                text=t.text,
                mask=t.mask,
                transcript=self.tokenizer.decode(t.token_ids, skip_special_tokens=True),
                turns=t.turns,
                tool_calls=t.calls,
                failed_tool_calls=t.failed_calls,
                env_reward=t.env_reward,
            )
            for t in trajectories
        ]
        other = max(time.perf_counter() - began - prefill - decode, 0.0)
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompt_ids],
            completions=completions,
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            prefill_seconds=prefill,
            decode_seconds=decode + other,  # environment time counts as rollout time
        )

    def close(self) -> None:
        self.sampler.close()

    def _sample_turn(
        self,
        prompt_ids: Sequence[Sequence[int]],
        active: list[_Trajectory],
        params: SamplingParams,
        stop: tuple[str, ...],
        turn: int,
    ) -> RolloutBatch:
        """One call of the wrapped sampler for every active trajectory, in their order. While no
        trajectory has tokens yet, each prompt is sampled n times from one shared prefill."""
        budget = max(params.max_new_tokens - len(t.token_ids) for t in active)
        seed = None if params.seed is None else params.seed + 7919 * turn
        if turn == 0 and all(not t.token_ids for t in active):
            return self.sampler.generate(prompt_ids, replace(params, stop=stop, seed=seed))
        turn_params = replace(params, n=1, max_new_tokens=budget, stop=stop, seed=seed)
        return self.sampler.generate([t.prompt_ids + t.token_ids for t in active], turn_params)

    def _append_turn(self, t: _Trajectory, c: Completion, params: SamplingParams) -> None:
        """Add the turn's tokens (cut to the trajectory's budget) as the policy's."""
        room = params.max_new_tokens - len(t.token_ids)
        token_ids, logprobs = c.token_ids[:room], c.logprobs[:room]
        t.token_ids += token_ids
        t.logprobs += logprobs
        t.mask += [True] * len(token_ids)
        t.turns += 1
        t.text = c.text if len(token_ids) == len(c.token_ids) else self._decode(token_ids)
        t.last_turn = token_ids
        t.last_finish = c.finish_reason
        if len(token_ids) < len(c.token_ids) or c.finish_reason == "length":
            t.finish_reason = "length"  # otherwise the environment decides whether it ends

    def _turn_text(self, t: _Trajectory) -> str:
        """The turn as the environment reads it: every token decoded, a closing stop string
        included (the sampler's `text` ends right before it)."""
        return self._decode(t.last_turn)

    def _react(self, t: _Trajectory, obs: Any, params: SamplingParams, last_turn: bool) -> None:
        t.calls += obs.calls
        t.failed_calls += obs.failed_calls
        t.env_reward += obs.reward
        if obs.done:
            t.finish_reason = t.last_finish
            return
        text = obs.text
        if self.chat:
            contents = getattr(obs, "outputs", None) or [obs.text]
            text = chat_observation(self.tokenizer, contents, after_eos=t.last_finish == "eos")
        observation = self._encode(text)
        if last_turn or len(t.token_ids) + len(observation) >= params.max_new_tokens:
            t.finish_reason = "length"  # out of turns, or no room to read the answer and go on
            return
        t.observe(observation)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


_CONTENT = "\x00posttrain-turn\x00"  # an assistant content no template will alter


def chat_observation(tokenizer: Any, contents: Sequence[str], *, after_eos: bool) -> str:
    """What the tokenizer's chat template writes after an assistant turn's content when tool
    messages with `contents` follow, up to the next assistant turn's content; without the
    template's end-of-turn token when the turn already ended on it (`after_eos`)."""
    messages = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": _CONTENT},
        *({"role": "tool", "content": c} for c in contents),
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    suffix = full[full.index(_CONTENT) + len(_CONTENT) :]
    eos = getattr(tokenizer, "eos_token", None)
    if after_eos and eos and suffix.startswith(eos):
        suffix = suffix[len(eos) :]
    return suffix
