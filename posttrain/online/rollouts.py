"""The online core: what every online recipe (GRPO family, PPO, iterative DPO, evaluation)
does with rollouts, written once.

    prompts = draw(train_prompts, step, count, seed)           # a pure function of the step
    rollouts = sample(sampler, prompts, params)                # G per prompt, prompt-major
    metrics = score(rollouts, reward)                          # reward, components, correct
    reference_pass(reference, rollouts, micro_batch_size, T)   # rollout.ref_logprobs
    for mb in micro_batches(rollouts, size, device):           # packed, each prompt once
        logprobs, entropy = completion_logprobs(model, mb, T)  # (1, K), with grad

A `Rollout` is one completion with everything learned from it, typed: token ids, a completion
mask (1 where the policy wrote the token: tool outputs a rollout engine inserts get 0 and leave
every loss), the sampler's log-probs, the reward and its components, then the per-token
tensors the recipe adds (pi_old, reference log-probs, values, advantages, returns).

pi_old is the sampler's log-probs: log_softmax(logits / T) of each sampled token, the quantity
the training forward computes (tests check they agree within 1e-5 in fp32), so it costs no
forward pass; `forward_logprobs` recomputes it where an engine's numerics differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace

import torch

from posttrain.config import PromptDataConfig, RayConfig
from posttrain.data.packing import Batch, pack_shared
from posttrain.data.prompts import Prompt
from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import token_entropy
from posttrain.models.logprobs import target_logits
from posttrain.models.reference import Reference
from posttrain.models.reward import RewardModel
from posttrain.rewards import CompositeReward, build_composite
from posttrain.rollout import FinishReason, Sampler, SamplingParams
from posttrain.rollout.multiturn import EnvironmentSampler
from posttrain.train.distributed import Dist
from posttrain.train.learner import step_indices


@dataclass
class Rollout:
    """One sampled completion of `prompt`, and what the recipe learns from it. Per-token
    tensors are `(T,)` over the completion's T tokens."""

    prompt: Prompt
    group: int
    """Which prompt of the step it answers: rollouts of one group share their prompt."""
    token_ids: list[int]
    """The sampled tokens, with the eos or stop token that ended the completion; multi-turn,
    the whole trajectory (observations included, masked out)."""
    text: str
    """What rewards score: the completion, or a multi-turn trajectory's last turn."""
    finish_reason: FinishReason
    sampler_logprobs: torch.Tensor
    completion_mask: torch.Tensor
    """`(T,)` bool: True where the policy wrote the token (it counts in every loss)."""
    reward: float = math.nan
    components: dict[str, float] = field(default_factory=dict)
    gold: float = math.nan
    """The gold score: rewards scored for monitoring only (a verifier the policy is not
    trained on); NaN without them."""
    correct: bool = False
    """The first gold reward (else the first reward) scored it at least 1."""
    step_scores: list[tuple[int, float]] | None = None
    """Process rewards: `(end_char, score)` of each step, from rewards that score steps."""
    skipped: bool = False
    """A reward failed under the 'skip' fallback: the rollout must leave the update."""
    transcript: str | None = None
    """Multi-turn: the whole trajectory's text (None: single-turn)."""
    turns: int = 1
    tool_calls: int = 0
    failed_tool_calls: int = 0
    env_reward: float = 0.0
    """Multi-turn: what the environment paid along the way, added to `reward` by `score`."""
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.token_ids

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def as_row(self) -> dict:
        """What samples.jsonl shows of it."""
        advantage = None if self.advantages is None else round(float(self.advantages[0]), 4)
        return {
            "prompt": self.prompt.text,
            "completion": self.text,
            "reward": round(self.reward, 4),
            "advantage": advantage,
            "correct": self.correct,
            "finish": self.finish_reason,
            "components": self.components,
        } | ({} if self.transcript is None else {
            "transcript": self.transcript, "turns": self.turns, "tool_calls": self.tool_calls,
        })  # fmt: skip


# The per-token tensors micro-batches carry, in this order, when every rollout has them.
TOKEN_FIELDS = ("old_logprobs", "ref_logprobs", "values", "advantages", "returns")


def draw(prompts: Sequence[Prompt], step: int, count: int, seed: int) -> list[Prompt]:
    """The `count` prompts of `step`: epochs of seeded permutations read in order, a pure
    function of the step (a resumed run draws the same)."""
    indices = step_indices(step, num_examples=len(prompts), batch_size=count, seed=seed)
    return [prompts[i] for i in indices]


def sample(
    sampler: Sampler, prompts: Sequence[Prompt], params: SamplingParams, first_group: int = 0
) -> list[Rollout]:
    """`params.n` rollouts of each prompt, prompt-major; groups numbered from `first_group`,
    which also offsets the seeded streams (`SamplingParams.first_prompt`), so prompts sampled
    in parts sample what they would together. A multi-turn sampler starts each episode from
    the prompt's row (its text and columns)."""
    ids = [p.token_ids for p in prompts]
    params = replace(params, first_prompt=params.first_prompt + first_group)
    if isinstance(sampler, EnvironmentSampler):
        rows = [{"prompt": p.text, **p.fields} for p in prompts]
        batch = sampler.generate(ids, params, rows=rows)
    else:
        batch = sampler.generate(ids, params)
    return [
        Rollout(
            prompt=prompts[c.prompt_index],
            group=first_group + c.prompt_index,
            token_ids=c.token_ids,
            text=c.text,
            finish_reason=c.finish_reason,
            sampler_logprobs=torch.tensor(c.logprobs),
            completion_mask=(
                torch.ones(len(c.token_ids), dtype=torch.bool)
                if c.mask is None
                else torch.tensor(c.mask, dtype=torch.bool)
            ),
            old_logprobs=torch.tensor(c.logprobs),
            transcript=c.transcript,
            turns=c.turns,
            tool_calls=c.tool_calls,
            failed_tool_calls=c.failed_tool_calls,
            env_reward=c.env_reward,
        )
        for c in batch.completions
    ]


def sample_groups(
    sampler: Sampler, prompts: Sequence[Prompt], params: SamplingParams, chunk: int = 64
) -> list[tuple[Prompt, list[Rollout]]]:
    """`params.n` rollouts of each prompt, grouped by prompt, keeping one rollout of each
    distinct non-empty text (what labelling ranks). Sampled `chunk` prompts at a time."""
    groups = []
    for start in range(0, len(prompts), chunk):
        with torch.inference_mode():
            rollouts = sample(sampler, prompts[start : start + chunk], params, first_group=start)
        for i in range(0, len(rollouts), params.n):
            distinct: dict[str, Rollout] = {}
            for r in rollouts[i : i + params.n]:
                if r.text.strip():
                    distinct.setdefault(r.text, r)
            groups.append((rollouts[i].prompt, list(distinct.values())))
    return groups


def sample_scored(
    sampler: Sampler,
    prompts: Sequence[Prompt],
    reward: CompositeReward,
    params: SamplingParams,
    gold: CompositeReward | None = None,
    chunk: int = 256,
    dist: Dist | None = None,
) -> list[list[Rollout]]:
    """`params.n` scored (and with `gold`, gold-scored) rollouts of each prompt, one list per
    prompt, sampled `chunk` prompts per sampler call: what held-out evaluation, best-of-N and
    the round-based recipes (iterative DPO, RFT) read. With `dist`, each process samples and
    scores its share of the prompts and every process gets all of them."""
    mine = range(len(prompts)) if dist is None else dist.share(len(prompts))
    rollouts: list[Rollout] = []
    for start in range(mine.start, mine.stop, chunk):
        part = sample(sampler, prompts[start : min(start + chunk, mine.stop)], params, start)
        score(part, reward, gold)
        rollouts += part
    if dist is not None:
        rollouts = dist.all_gather(rollouts)
    n = params.n
    return [rollouts[k * n : (k + 1) * n] for k in range(len(prompts))]


def sample_step(
    sampler: Sampler,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    reward: CompositeReward,
    dist: Dist,
    first_group: int = 0,
    gold: CompositeReward | None = None,
) -> tuple[list[Rollout], dict[str, float]]:
    """A training step's rollouts: each process samples and scores its contiguous share of
    `prompts` (whole groups: a group's rewards are computed where it was sampled), then every
    process gets every rollout, prompt-major as one process would have them, and the reward
    metrics (failures summed over processes, seconds the slowest's); with `gold`, gold-scored."""
    mine = dist.share(len(prompts))
    rollouts = sample(sampler, prompts[mine.start : mine.stop], params, first_group + mine.start)
    metrics = score(rollouts, reward, gold)
    if dist.world_size == 1:
        return rollouts, metrics
    every = dist.all_gather([metrics])
    combined = {
        k: (max if k.endswith("seconds") else sum)(m[k] for m in every if k in m) for k in every[0]
    }
    return dist.all_gather(rollouts), combined


def shared_pass(rollouts: Sequence[Rollout], dist: Dist | None, fn) -> list:
    """`fn(part)` -> one value per rollout of `part`, run by each process on its share of
    `rollouts`; every process gets the values of all of them, in order."""
    if dist is None or dist.world_size == 1:
        return list(fn(rollouts))
    mine = dist.share(len(rollouts))
    values = list(fn(rollouts[mine.start : mine.stop])) if len(mine) else []
    return dist.all_gather(values)


def sync_weights(sampler: Sampler, policy: torch.nn.Module) -> float:
    """Hand an engine that holds its own copy of the weights (vLLM) the policy's current ones,
    after the step's optimizer steps and before it samples again; the built-in sampler reads
    the live module and needs nothing. Returns the seconds it took."""
    engine = sampler.sampler if isinstance(sampler, EnvironmentSampler) else sampler
    update = getattr(engine, "update_weights", None)
    if update is None:
        return 0.0
    began = time.perf_counter()
    update(getattr(policy, "module", policy))
    return time.perf_counter() - began


def sampler_gap(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """How far the sampler's log-probs are from pi_old recomputed by the learner, over the
    policy's tokens (an engine's numerics: bf16 decode, vLLM kernels)."""
    gaps = [(r.old_logprobs - r.sampler_logprobs).abs()[r.completion_mask] for r in rollouts]
    gap = torch.cat(gaps) if gaps else torch.zeros(0)
    if not len(gap):
        return {}
    return {
        "sampler_logprob_gap/mean": float(gap.mean()),
        "sampler_logprob_gap/max": float(gap.max()),
    }


def train_share(items: Sequence, dist: Dist) -> tuple[list, bool]:
    """This process's contiguous share of a minibatch, and whether it is real: with fewer
    items than processes, a process without a share gets a stand-in item to train on with
    weight 0 and `zero_loss` (every process must run a backward pass for the gradients to be
    averaged over them)."""
    mine = dist.share(len(items))
    if len(mine) == 0:
        return list(items[:1]), False
    return list(items[mine.start : mine.stop]), True


def zero_loss(loss_fn):
    """`loss_fn` with its loss and metric sums times 0: a stand-in micro-batch's."""

    def zeroed(model, mb):
        loss, metrics = loss_fn(model, mb)
        return loss * 0, {k: v * 0 for k, v in metrics.items()}

    return zeroed


def task_reward(
    specs: Sequence[dict] | None, data: PromptDataConfig, ray: RayConfig | None = None
) -> CompositeReward:
    """The weighted reward of a config's `rewards` list; unset, the task's own verifiers for
    the options it was made with (`data.task`), which a prompt file does not have. With
    `ray.reward_workers`, scored in Ray actors (on `ray.address`, or a local Ray)."""
    if specs is None:
        if not data.task:
            raise ValueError(
                "rewards: not set, and data.task names no task whose verifiers could score the "
                "completions; list them, e.g. rewards: [{name: exact_match}]"
            )
        from posttrain.tasks import TASKS

        specs = TASKS[data.task].default_rewards(data.task_options)
    workers = ray.reward_workers if ray is not None else 0
    if workers:
        from posttrain.rewards.ray_pool import connect

        connect(ray.address)
    return build_composite(specs, ray_workers=workers)


def reward_inputs(rollouts: Sequence[Rollout]) -> tuple[list, list[str], dict[str, list]]:
    """What a reward function is called with for `rollouts`: prompts, completion texts, and
    each prompt field as a column, plus `completion_lengths` (tokens)."""
    names = {k for r in rollouts for k in r.prompt.fields}
    columns = {k: [r.prompt.fields.get(k) for r in rollouts] for k in sorted(names)}
    columns["completion_lengths"] = [len(r.token_ids) for r in rollouts]
    return [r.prompt.text for r in rollouts], [r.text for r in rollouts], columns


def score(
    rollouts: Sequence[Rollout], reward: CompositeReward, gold: CompositeReward | None = None
) -> dict[str, float]:
    """Score every rollout with the weighted reward: fills `reward` (NaN when skipped),
    `components` and `skipped`; with `gold`, also `gold` and the gold components (as
    `gold/<name>`). `correct`: the first gold component, else the first reward component,
    scored at least 1. Returns the composites' per-batch metrics. Reward functions get each
    prompt's fields and `completion_lengths`. A multi-turn rollout's environment reward is
    added to its reward (as the component 'environment')."""
    if not rollouts:
        return {}
    prompts, texts, columns = reward_inputs(rollouts)
    output = reward(prompts, texts, **columns)
    judge, judged = reward, output
    if gold is not None:
        judge, judged = gold, gold(prompts, texts, **columns)
    first = judged.components[judge.components[0].name]
    skipped = output.skipped or [False] * len(rollouts)
    multi_turn = any(r.transcript is not None for r in rollouts)
    for i, r in enumerate(rollouts):
        r.reward = float(output.scores[i]) + r.env_reward
        r.components = {k: float(v[i]) for k, v in output.components.items()}
        if multi_turn:
            r.components["environment"] = r.env_reward
        if gold is not None:
            r.gold = float(judged.scores[i])
            r.components.update({f"gold/{k}": float(v[i]) for k, v in judged.components.items()})
        r.correct = float(first[i]) >= 1.0  # NaN (skipped) compares False
        r.skipped = bool(skipped[i])
        r.step_scores = None if output.step_scores is None else output.step_scores[i]
    # Per-component means are `sampled_metrics`' job; failures and seconds are the composite's.
    metrics = output.metrics if gold is None else {**output.metrics, **judged.metrics}
    return {k: v for k, v in metrics.items() if not k.endswith("/mean")}


def step_positions(tokenizer, token_ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """The index of the token that ends each step: the first token whose decoded prefix of
    `token_ids` reaches the step's `end_char` (clamped to the last token)."""
    lengths: dict[int, int] = {}

    def reach(k: int) -> int:  # characters decoded from tokens 0..k
        if k not in lengths:
            lengths[k] = len(tokenizer.decode(token_ids[: k + 1], skip_special_tokens=True))
        return lengths[k]

    out = []
    for end in ends:
        low, high = 0, len(token_ids) - 1
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if reach(mid) < end else (low, mid)
        out.append(low)
    return out


def step_rewards(rollout: Rollout, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`(T,)` float: each step's score on the token that ends it (`step_positions`), 0
    elsewhere; and `(T,)` bool: which tokens end a step. No step scores: zeros."""
    T = len(rollout.token_ids)
    values, is_step = torch.zeros(T), torch.zeros(T, dtype=torch.bool)
    if rollout.step_scores and T:
        ends = step_positions(tokenizer, rollout.token_ids, [e for e, _ in rollout.step_scores])
        for position, (_, score) in zip(ends, rollout.step_scores, strict=True):
            values[position] += score
            is_step[position] = True
    return values, is_step


@dataclass
class MicroBatch:
    """Rollouts packed for one forward pass: each prompt's tokens once (`pack_shared`), then
    its completions. Token tensors are `(1, K)` over the K completion tokens in rollout order."""

    batch: Batch
    cu_seqlens: torch.Tensor
    """`(S + 1,)`: completion s owns tokens cu[s]:cu[s + 1] of K."""
    mask: torch.Tensor
    """`(1, K)` bool: the completion masks."""
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Completion tokens the policy wrote (what token means average over)."""
        return int(self.mask.sum())

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    def to(self, device: torch.device) -> MicroBatch:
        move = {f.name: getattr(self, f.name) for f in fields(self)}
        return MicroBatch(
            **{k: v.to(device) if torch.is_tensor(v) or isinstance(v, Batch) else v
               for k, v in move.items()}
        )  # fmt: skip


def micro_batches(rollouts: Sequence[Rollout], size: int, device: torch.device) -> list[MicroBatch]:
    """`size` consecutive rollouts at a time; consecutive rollouts of one group share their
    prompt's tokens. Each per-token field is carried when every rollout has it."""
    out = []
    for chunk in (rollouts[i : i + size] for i in range(0, len(rollouts), size)):
        groups: list[tuple[list[int], list[TokenizedExample]]] = []
        last_group = None
        for r in chunk:
            if r.group != last_group:
                groups.append((r.prompt_ids, []))
                last_group = r.group
            groups[-1][1].append(TokenizedExample(r.token_ids, [True] * len(r.token_ids)))
        tokens = {
            name: torch.cat([getattr(r, name) for r in chunk])[None]
            for name in TOKEN_FIELDS
            if all(getattr(r, name) is not None for r in chunk)
        }
        mb = MicroBatch(
            pack_shared(groups),
            cu_seqlens=torch.tensor([0] + [len(r.token_ids) for r in chunk]).cumsum(0),
            mask=torch.cat([r.completion_mask for r in chunk])[None],
            **tokens,
        )
        out.append(mb.to(device))
    return out


def completion_logprobs(
    model: torch.nn.Module, mb: MicroBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(1, K)` log-probs of the completion tokens under log_softmax(logits / temperature), and
    the `(1, K)` entropies of those distributions (no grad): the LM head runs on these K only."""
    logits, targets = target_logits(model, mb.batch)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logprobs = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(1)
    with torch.no_grad():
        entropy = token_entropy(logits)
    return logprobs[None], entropy[None]


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module,
    rollouts: Sequence[Rollout],
    size: int,
    temperature: float,
    *,
    autocast=nullcontext,
) -> list[torch.Tensor]:
    """Each rollout's `(T,)` log-probs from a no-grad training forward in eval mode (the
    reference pass; pi_old recomputed). `autocast`: the learner's autocast context."""
    module = getattr(model, "module", model)
    was_training, device = module.training, next(module.parameters()).device
    module.eval()
    try:
        with autocast():
            logprobs = [
                completion_logprobs(module, mb, temperature)[0][0].float().cpu()
                for mb in micro_batches(rollouts, size, device)
            ]
    finally:
        module.train(was_training)
    return list(torch.cat(logprobs).split([len(r.token_ids) for r in rollouts]))


def reference_pass(
    reference: Reference,
    rollouts: Sequence[Rollout],
    size: int,
    temperature: float,
    dist: Dist | None = None,
) -> None:
    """Set each rollout's `ref_logprobs` with `reference` (a frozen copy, or the policy with
    its LoRA adapters disabled); with `dist`, each process computes its share."""
    if not rollouts:
        return

    def part(rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
        with reference.model() as module:
            return forward_logprobs(
                module, rollouts, size, temperature, autocast=reference.autocast
            )

    logprobs = shared_pass(rollouts, dist, part)
    for r, lp in zip(rollouts, logprobs, strict=True):
        r.ref_logprobs = lp


def value_pass(
    critic: RewardModel,
    rollouts: Sequence[Rollout],
    size: int,
    *,
    autocast=nullcontext,
    dist: Dist | None = None,
) -> None:
    """Set each rollout's `values` `(T,)`: the critic's V(s_t) of the state before each
    completion token (`RewardModel.token_scores`), from a no-grad forward in eval mode; with
    `dist`, each process computes its share."""
    if not rollouts:
        return
    values = shared_pass(rollouts, dist, lambda part: critic_values(critic, part, size, autocast))
    for r, v in zip(rollouts, values, strict=True):
        r.values = v


@torch.no_grad()
def critic_values(
    critic: RewardModel, rollouts: Sequence[Rollout], size: int, autocast=nullcontext
) -> list[torch.Tensor]:
    """Each rollout's `(T,)` values from `critic` (no grad, eval mode)."""
    if not rollouts:
        return []
    was_training, device = critic.training, next(critic.parameters()).device
    critic.eval()
    try:
        with autocast():
            values = [
                critic.token_scores(mb.batch)[:, 0].float().cpu()
                for mb in micro_batches(rollouts, size, device)
            ]
    finally:
        critic.train(was_training)
    return list(torch.cat(values).split([len(r.token_ids) for r in rollouts]))


def sampled_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Means over the sampled rollouts: reward (skipped ones aside), each component, the gold
    score and its components (with gold rewards), accuracy, completion length and the fraction
    cut at max_new_tokens."""
    if not rollouts:
        return {}
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    scored = [r for r in rollouts if not r.skipped]
    out = {
        "reward": mean([r.reward for r in scored]) if scored else math.nan,
        "accuracy": mean([float(r.correct) for r in rollouts]),
        "completion_length": mean([len(r.token_ids) for r in rollouts]),
        "truncated_fraction": mean([float(r.truncated) for r in rollouts]),
    }
    for name in rollouts[0].components:
        kept = [r.components[name] for r in rollouts if not math.isnan(r.components[name])]
        key = name if name.startswith("gold/") else f"reward/{name}"
        out[key] = mean(kept) if kept else math.nan
    golds = [r.gold for r in rollouts if not math.isnan(r.gold)]
    if golds:
        out["gold"] = mean(golds)
    if any(r.transcript is not None for r in rollouts):
        out.update(tool_metrics(rollouts))
    return out


def tool_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Multi-turn rollouts: tool calls per trajectory, the share of calls that worked, turns,
    the share of trajectories with a call, and reward and accuracy with and without a call
    (NaN where no trajectory falls in that half)."""
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    calls = sum(r.tool_calls for r in rollouts)
    failed = sum(r.failed_tool_calls for r in rollouts)
    called = [r for r in rollouts if r.tool_calls]
    silent = [r for r in rollouts if not r.tool_calls]
    return {
        "tools/calls": calls / len(rollouts),
        "tools/call_success": 1 - failed / calls if calls else math.nan,
        "tools/turns": mean([r.turns for r in rollouts]),
        "tools/with_call": len(called) / len(rollouts),
        "tools/reward_with_call": mean([r.reward for r in called if not r.skipped]),
        "tools/reward_without_call": mean([r.reward for r in silent if not r.skipped]),
        "tools/accuracy_with_call": mean([float(r.correct) for r in called]),
        "tools/accuracy_without_call": mean([float(r.correct) for r in silent]),
    }
