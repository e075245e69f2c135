"""Multi-turn rollouts (rollout/multiturn.py): observation tokens are context, never actions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.prompts import Prompt
from posttrain.data.records import PromptRecord
from posttrain.losses import grpo_advantages, ppo_policy_loss
from posttrain.models.tiny import build_tokenizer
from posttrain.online import (
    completion_logprobs,
    forward_logprobs,
    micro_batches,
    sample,
    score,
    tool_metrics,
)
from posttrain.recipes.grpo import objective
from posttrain.recipes.grpo_config import GRPOConfig
from posttrain.recipes.ppo import advantages_and_returns
from posttrain.recipes.ppo_config import PPOSection
from posttrain.rewards import build_composite
from posttrain.rollout import Completion, HFSampler, RolloutBatch, SamplingParams
from posttrain.rollout.multiturn import EnvironmentSampler, chat_observation
from posttrain.tools import CALL_CLOSE, Observation, ToolEnvironment, build_tools

# A quarter of the byte tokens end a turn, so the tiny random model writes short turns.
STOPS = tuple(range(3, 256, 4))


class Counter:
    """Answers every turn with `<obs k>` (k counts the turns) until turn `turns` (at most; a
    prompt of n characters ends after n % 3 + 1 turns), paying -0.1 per answer: an environment
    whose observations are known."""

    def __init__(self, turns: int = 3) -> None:
        self.turns, self.seen = turns, 0

    def reset(self, row: dict) -> str:
        self.turns = min(self.turns, len(row["prompt"]) % 3 + 1)
        return ""

    def step(self, turn: str) -> Observation:
        self.seen += 1
        if self.seen >= self.turns:
            return Observation("", done=True)
        return Observation(f"<obs {self.seen}>", done=False, reward=-0.1, calls=1)


class CountingSampler(HFSampler):
    calls = 0

    def generate(self, prompt_ids, params):
        self.calls += 1
        return super().generate(prompt_ids, params)


def _prompts() -> list[Prompt]:
    tok = build_tokenizer()
    texts = ["12*34=", "7*8=", "10*3="]  # 1, 2 and 3 turns
    return [Prompt(PromptRecord(t, fields={"answer": "1"}), tok.encode(t), "test") for t in texts]


def _rollouts(tiny_qwen2, turns=3, max_turns=4, max_new_tokens=64, seed=0, chat=False):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    tok = build_tokenizer()
    inner = CountingSampler(model, tok, seed=seed)
    sampler = EnvironmentSampler(inner, tok, lambda: Counter(turns), max_turns=max_turns, chat=chat)
    params = SamplingParams(
        n=4, max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=STOPS, seed=seed
    )
    return model, tok, inner, sample(sampler, _prompts(), params)


def test_trajectory_logprobs_equal_a_plain_forward_over_the_same_tokens(tiny_qwen2):
    """The sampler's log-prob of every token the policy wrote, after observations it did not
    write, equals the packed training forward over prompt + trajectory (1e-5 in fp32)."""
    model, tok, _, rs = _rollouts(tiny_qwen2)
    assert [r.turns for r in rs] == [1] * 4 + [2] * 4 + [3] * 4
    observed = [r for r in rs if not r.completion_mask.all()]
    assert observed, "no trajectory holds observation tokens"
    for r in observed:
        assert "<obs 1>" in r.transcript
        masked = tok.decode(
            [t for t, m in zip(r.token_ids, r.completion_mask, strict=True) if not m]
        )
        assert masked.startswith("<obs 1>")
        assert float(r.old_logprobs[~r.completion_mask].abs().max()) == 0.0
    recomputed = forward_logprobs(model, rs, 5, 1.0)
    for lp, r in zip(recomputed, rs, strict=True):
        mask = r.completion_mask
        assert float((lp[mask] - r.old_logprobs[mask]).abs().max()) < 1e-5


def test_turns_of_every_trajectory_are_sampled_together(tiny_qwen2):
    """One sampler call per turn for all 12 trajectories, never one call per trajectory."""
    _, _, inner, rs = _rollouts(tiny_qwen2)
    assert len(rs) == 12
    assert inner.calls == max(r.turns for r in rs) <= 3


def test_text_is_the_last_turn_and_budgets_hold(tiny_qwen2):
    _, tok, _, rs = _rollouts(tiny_qwen2, max_turns=2, max_new_tokens=12)
    assert all(len(r.token_ids) <= 12 and r.turns <= 2 for r in rs)
    # Episodes of 3 turns run out of turns (or tokens) before the environment ends them.
    assert [r.finish_reason for r in rs[8:]] == ["length"] * 4
    for r in rs:
        last = r.token_ids[len(r.token_ids) - _last_turn_length(r) :]
        # The text stops before the turn's stop token (a byte: it may complete a character the
        # text then ends with half of, shown as U+FFFD); the transcript keeps it.
        text = r.text.rstrip("\ufffd")
        assert tok.decode(last).startswith(text) and r.transcript.endswith(tok.decode(last))
    assert any(r.finish_reason == "stop" for r in rs[:8])  # some 1- or 2-turn episodes end


def _last_turn_length(r) -> int:
    mask = r.completion_mask.tolist()
    n = 0
    while n < len(mask) and mask[len(mask) - 1 - n]:
        n += 1
    return n


def test_environment_reward_joins_the_outcome_reward(tiny_qwen2):
    _, _, _, rs = _rollouts(tiny_qwen2)
    reward = build_composite([{"name": "exact_match"}])
    metrics = score(rs, reward)
    assert metrics is not None
    for r in rs:
        # Counter pays -0.1 for each observation it wrote before ending the episode.
        assert r.components["environment"] == pytest.approx(-0.1 * r.tool_calls)
        assert r.reward == pytest.approx(r.components["exact_match"] - 0.1 * r.tool_calls)
        assert r.tool_calls == r.turns - 1 or r.finish_reason == "length"


def _with_observations(tiny_qwen2):
    model, _, _, rs = _rollouts(tiny_qwen2)
    g = torch.Generator().manual_seed(0)
    for r in rs:
        r.ref_logprobs = -torch.rand(len(r.token_ids), generator=g) * 4
    return model, rs


def _scramble_observations(rs, g) -> None:
    """Change every per-token input at observation tokens: nothing downstream may notice."""
    for r in rs:
        hidden = ~r.completion_mask
        for name in ("ref_logprobs", "old_logprobs", "advantages"):
            value = getattr(r, name)
            if value is not None:
                value = value.clone()
                value[hidden] = torch.randn(int(hidden.sum()), generator=g) * 5
                setattr(r, name, value)


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo"])
def test_observation_tokens_get_no_gradient_and_no_kl_in_grpo(algo, tiny_qwen2):
    model, rs = _with_observations(tiny_qwen2)
    g = GRPOConfig(algo=algo, grpo={"beta": 0.1, "group_size": 4}).grpo
    rewards = torch.tensor([float(i % 3 == 0) for i in range(len(rs))])
    for r, a in zip(rs, grpo_advantages(rewards, 4, scale_by_std=True), strict=True):
        r.advantages = a.expand(len(r.token_ids)).clone()

    def loss_and_grad():
        (mb,) = micro_batches(rs, 64, torch.device("cpu"))
        logprobs, _ = completion_logprobs(model, mb, 1.0)
        logprobs = logprobs.detach().requires_grad_()
        loss, metrics = objective(logprobs + 0.05, mb, g, max_new_tokens=64)  # ratio != 1
        loss.backward()
        return float(loss.detach()), float(metrics["kl"].detach()), logprobs.grad[0], mb.mask[0]

    loss, kl, grad, mask = loss_and_grad()
    assert kl > 0 and grad[mask].abs().sum() > 0
    assert float(grad[~mask].abs().max()) == 0.0
    _scramble_observations(rs, torch.Generator().manual_seed(1))
    loss2, kl2, _, _ = loss_and_grad()
    assert (loss2, kl2) == pytest.approx((loss, kl), abs=1e-6)


def test_observation_tokens_get_no_gradient_and_no_kl_in_ppo(tiny_qwen2):
    """PPO: GAE skips observation tokens (the k1 penalty there is 0, values there unused), and
    the policy loss gives them no gradient."""
    model, rs = _with_observations(tiny_qwen2)
    p = PPOSection()
    g = torch.Generator().manual_seed(2)
    for r in rs:
        r.values = torch.randn(len(r.token_ids), generator=g)
    scores = torch.tensor([float(i % 2) for i in range(len(rs))])

    def advantages():
        stats = advantages_and_returns(rs, scores, 0.1, p)
        return stats, [r.advantages[r.completion_mask].clone() for r in rs]

    stats, before = advantages()
    for r in rs:  # observation tokens' values and log-probs must not reach any advantage
        hidden = ~r.completion_mask
        r.values = r.values.clone()
        r.values[hidden] = torch.randn(int(hidden.sum()), generator=g) * 5
    _scramble_observations(rs, g)
    stats2, after = advantages()
    assert stats2["kl"] == pytest.approx(stats["kl"], abs=1e-6)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
    (mb,) = micro_batches(rs, 64, torch.device("cpu"))
    logprobs, _ = completion_logprobs(model, mb, 1.0)
    leaf = logprobs.detach().requires_grad_()
    loss, _ = ppo_policy_loss(  # as ppo.policy_loss calls it
        leaf + 0.05, mb.old_logprobs, mb.advantages, mb.mask, clip_eps_low=p.clip_eps,
        agg="token_mean", denominator=1.0,
    )  # fmt: skip
    loss.backward()
    assert float(leaf.grad[0][~mb.mask[0]].abs().max()) == 0.0
    assert float(leaf.grad[0][mb.mask[0]].abs().sum()) > 0


def test_chat_observations_are_what_the_template_puts_between_assistant_turns():
    tok = build_tokenizer()  # ChatML: <|im_start|>role\ncontent<|im_end|>\n
    assert chat_observation(tok, ["287663"], after_eos=False) == (
        "<|im_end|>\n<|im_start|>tool\n287663<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_observation(tok, ["1", "2"], after_eos=True) == (
        "\n<|im_start|>tool\n1<|im_end|>\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_rollouts_wrap_observations_in_the_templates_tool_turns(tiny_qwen2):
    model, tok, _, rs = _rollouts(tiny_qwen2, max_new_tokens=96, chat=True)
    observed = [r for r in rs if not r.completion_mask.all()]
    assert observed
    for r in observed:
        hidden = [t for t, m in zip(r.token_ids, r.completion_mask, strict=True) if not m]
        text = tok.decode(hidden)
        assert text.startswith("<|im_end|>\n<|im_start|>tool\n<obs 1><|im_end|>\n")
        assert "<|im_start|>assistant\n" in text
    recomputed = forward_logprobs(model, rs, 5, 1.0)
    for lp, r in zip(recomputed, rs, strict=True):
        mask = r.completion_mask
        assert float((lp[mask] - r.old_logprobs[mask]).abs().max()) < 1e-5


class ScriptedPolicy:
    """A `Sampler` that writes the turns of `script` in order (each ending as the sampler would:
    at the turn's stop string, or at eos): a policy whose turns are known, so that the loop and
    the real tools around it are what is tested."""

    def __init__(self, tokenizer, script: list[str]) -> None:
        self.tokenizer, self.script, self.turn = tokenizer, script, 0

    def generate(self, prompt_ids, params):
        text = self.script[self.turn]
        self.turn += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        stop = next((s for s in params.stop if text.endswith(s)), None)
        if stop is None:
            ids.append(self.tokenizer.eos_token_id)
        rows = len(prompt_ids) * params.n
        completions = [
            Completion(
                i // params.n,
                list(ids),
                [-1.0] * len(ids),
                "stop" if stop else "eos",
                text[: -len(stop)] if stop else text,
            )  # fmt: skip
            for i in range(rows)
        ]
        return RolloutBatch([list(p) for p in prompt_ids], completions, 0, rows * len(ids), 0, 0)


CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "347*829"}}</tool_call>'


@pytest.mark.parametrize(
    ("call", "response", "failed"),
    [
        (CALL, "<tool_response>\n287663\n</tool_response>", 0),
        (CALL.replace("calculator", "calc"), "error: unknown tool 'calc'", 1),
        (CALL.replace("}}<", "}<"), "error: invalid JSON", 1),
    ],
)
def test_a_calculator_call_is_answered_masked_and_the_last_turn_scored(call, response, failed):
    tok = build_tokenizer()
    policy = ScriptedPolicy(tok, [call, "287663"])
    env = lambda: ToolEnvironment(build_tools(["calculator"]), call_cost=0.25)  # noqa: E731
    sampler = EnvironmentSampler(policy, tok, env, max_turns=3, turn_stop=(CALL_CLOSE,))
    prompt = Prompt(
        PromptRecord("347*829=", fields={"answer": "287663"}), tok.encode("347*829="), "t"
    )
    (r,) = sample(sampler, [prompt], SamplingParams(n=1, max_new_tokens=400))
    observed = tok.decode([t for t, m in zip(r.token_ids, r.completion_mask, strict=True) if not m])
    assert response in observed
    written = tok.decode([t for t, m in zip(r.token_ids, r.completion_mask, strict=True) if m])
    assert written.startswith(call) and r.text == "287663"
    assert (r.turns, r.tool_calls, r.failed_tool_calls) == (2, 1, failed)
    reward = build_composite([{"name": "math", "options": {"extract": "full"}}])
    score([r], reward)
    assert r.correct  # the scripted answer is right either way: the reward reads the last turn
    assert r.reward == pytest.approx(1 - 0.25)
    metrics = tool_metrics([r])
    assert metrics["tools/call_success"] == 1 - failed and metrics["tools/with_call"] == 1
