"""GRPO recipe parts: the shared-prompt training forward, reuse of the sampler's logprobs,
dynamic sampling, and each algorithm's advantages and loss on hand-made groups."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import ConfigError, PromptDataConfig, load_config
from posttrain.data.packing import pack
from posttrain.data.prompts import Prompt, load_prompts
from posttrain.data.records import PromptRecord
from posttrain.data.tokenize import TokenizedExample
from posttrain.models.tiny import build_tokenizer
from posttrain.online import (
    MicroBatch,
    Rollout,
    completion_logprobs,
    forward_logprobs,
    micro_batches,
    sample,
    sample_groups,
    score,
    task_reward,
)
from posttrain.recipes.grpo import (
    advantages_of,
    grpo_reward,
    keep_groups,
    loss_weight,
    objective,
)
from posttrain.recipes.grpo_config import ALGOS, GRPOConfig
from posttrain.rewards import build_composite
from posttrain.rollout import HFSampler, SamplingParams


def rollouts(seed: int, groups=((5, (3, 7, 1)), (2, (4, 2, 6)))) -> list[Rollout]:
    """Groups of rollouts (prompt length, completion lengths) with random tokens and
    log-probs; the rollouts of a group share one prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (prompt_len, lengths) in enumerate(groups):
        ids = torch.randint(0, 256, (prompt_len,), generator=g).tolist()
        prompt = Prompt(PromptRecord("p"), ids, "test")
        for n in lengths:
            logprobs = -torch.rand(n, generator=g) * 6
            out.append(
                Rollout(
                    prompt,
                    k,
                    torch.randint(0, 256, (n,), generator=g).tolist(),
                    "",
                    "stop",
                    logprobs,
                    torch.ones(n, dtype=torch.bool),
                    reward=float(torch.rand((), generator=g)),
                    old_logprobs=logprobs,
                    ref_logprobs=-torch.rand(n, generator=g) * 6,
                    advantages=torch.randn(n, generator=g),
                )  # fmt: skip
            )
    return out


def _plain(rs: list[Rollout]) -> MicroBatch:
    """The same completions as independent `prompt + completion` sequences (prompt repeated)."""
    examples = [
        TokenizedExample(r.prompt_ids + r.token_ids, [False] * len(r.prompt_ids) + [True] * len(r.token_ids))
        for r in rs
    ]  # fmt: skip
    cat = lambda key: torch.cat([getattr(r, key) for r in rs])[None]  # noqa: E731
    return MicroBatch(
        pack(examples), torch.tensor([0] + [len(r.token_ids) for r in rs]).cumsum(0),
        cat("completion_mask"), cat("old_logprobs"), cat("ref_logprobs"), advantages=cat("advantages"),
    )  # fmt: skip


@pytest.mark.parametrize("algo", ["grpo", "dapo"])
def test_shared_prompt_forward_equals_plain_forward(algo, tiny_qwen2):
    """Loss (clipped surrogate + KL) and every gradient match within 1e-5, while the packed
    row holds each prompt once. In float64, so that fp32 summation order (one gradient entry in
    4096 differs by 1.4e-5 in fp32) does not hide a real difference."""
    g, temperature = GRPOConfig(algo=algo, grpo={"beta": 0.1}).grpo, 0.8
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float64)
    rs = rollouts(0)
    for r in rs:
        for key in ("old_logprobs", "ref_logprobs", "advantages"):
            setattr(r, key, getattr(r, key).double())
    (shared,) = micro_batches(rs, 16, torch.device("cpu"))
    plain = _plain(rs)
    assert shared.batch.input_ids.shape[1] == 5 + 2 + sum(len(r.token_ids) for r in rs)
    assert shared.batch.input_ids.shape[1] < plain.batch.input_ids.shape[1]

    def loss_and_grads(mb: MicroBatch):
        model.zero_grad()
        logprobs, _ = completion_logprobs(model, mb, temperature)
        loss, _ = objective(logprobs, mb, g, max_new_tokens=16)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_shared, grads_shared = loss_and_grads(shared)
    loss_plain, grads_plain = loss_and_grads(plain)
    assert loss_shared.abs() > 0.01
    torch.testing.assert_close(loss_shared, loss_plain, atol=1e-5, rtol=0)
    for a, b in zip(grads_shared, grads_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sampler_logprobs_equal_the_training_forward(tiny_qwen2):
    """pi_old is reused from the sampler (decode path, KV cache): it must equal the training
    forward (packed, shared prompt, logits at completion tokens only) within 1e-5 in fp32."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    sampler = HFSampler(model, seed=0)
    prompts = [[5, 17, 99, 3, 42, 8, 1], [200, 7], [9, 9, 9, 9]]
    params = SamplingParams(n=4, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    rs = sample(sampler, [Prompt(PromptRecord("p"), ids, "test") for ids in prompts], params)
    assert [r.group for r in rs] == [0] * 4 + [1] * 4 + [2] * 4
    assert len({len(r.token_ids) for r in rs}) > 1  # some rows end early (eos)
    recomputed = forward_logprobs(model, rs, 5, 0.7)  # micro-batches split groups too
    diff = max(float((a - r.old_logprobs).abs().max()) for a, r in zip(recomputed, rs, strict=True))
    assert diff < 1e-5


def test_sample_groups_keeps_each_prompts_distinct_texts_whatever_the_chunks(tiny_qwen2):
    """What labelling ranks: per prompt, one rollout of each distinct non-empty text, in sampled
    order; each prompt samples its own seeded stream, so chunks do not change the texts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    tokenizer = build_tokenizer()
    prompts = [Prompt(PromptRecord(t), tokenizer.encode(t), "test") for t in ("ab", "cd", "ef")]
    params = SamplingParams(n=6, max_new_tokens=1, temperature=1.0, seed=7)
    groups = sample_groups(HFSampler(model, tokenizer), prompts, params, chunk=2)
    assert [p.text for p, _ in groups] == ["ab", "cd", "ef"]
    together = sample(HFSampler(model, tokenizer), prompts, params)  # one call, no chunks
    for k, (prompt, kept) in enumerate(groups):
        texts = [r.text for r in together[6 * k : 6 * k + 6] if r.text.strip()]
        assert [r.text for r in kept] == list(dict.fromkeys(texts))
        assert all(r.prompt is prompt for r in kept)
    assert any(len(kept) < 6 for _, kept in groups)  # one-token samples repeat: duplicates go


def test_dynamic_sampling_keeps_only_groups_whose_rewards_vary():
    rewards = ([1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1])
    groups = [rollouts(0, groups=((2, (1, 1, 1)),)) for _ in rewards]
    for group, values in zip(groups, rewards, strict=True):
        for r, value in zip(group, values, strict=True):
            r.reward = value
    kept: list = []
    assert keep_groups(kept, groups[:3], wanted=2, dynamic=True) == 2  # two groups did not vary
    assert kept == [groups[1]]
    assert keep_groups(kept, groups[3:], wanted=2, dynamic=True) == 0  # the refill round
    assert kept == [groups[1], groups[3]]  # full at 2: the last varied group is not taken
    everything: list = []
    keep_groups(everything, groups, wanted=5, dynamic=False)
    assert everything == groups


def _group(
    rewards, lengths, max_new_tokens=16, **overrides
) -> tuple[list[Rollout], MicroBatch, object]:
    g = GRPOConfig(algo=overrides.pop("algo"), grpo={"group_size": len(rewards), **overrides}).grpo
    rs = rollouts(1, groups=((3, lengths),))
    for r, reward in zip(rs, rewards, strict=True):
        r.reward = reward
    for r, a in zip(rs, advantages_of(rs, [True] * len(rs), g), strict=True):
        r.advantages = a
    (mb,) = micro_batches(rs, 16, torch.device("cpu"))
    return rs, mb, (g, max_new_tokens)


def _loss(mb: MicroBatch, g, logprobs: torch.Tensor | None = None) -> float:
    """What the learner optimizes for one micro-batch: the loss sum over its weight."""
    g, max_new_tokens = g
    loss, _ = objective(mb.old_logprobs if logprobs is None else logprobs, mb, g, max_new_tokens)
    return float(loss) / loss_weight(mb, g.aggregation)


def test_grpo_wiring():
    # rewards 1, 0, 0, 1: mean 0.5, std (Bessel) sqrt(4 * 0.25 / 3) = 0.57735
    samples, mb, g = _group([1, 0, 0, 1], (1, 3, 2, 2), algo="grpo")
    a = 0.5 / math.sqrt(1 / 3)
    assert [float(s.advantages[0]) for s in samples] == pytest.approx([a, -a, -a, a], abs=1e-5)
    assert (g[0].clip_eps_low, g[0].clip_eps_high, g[0].beta, g[0].kl_in) == (
        0.2,
        0.2,
        0.04,
        "loss",
    )
    # ratio 1: loss = -1/G sum_i mean_t A_i + beta * mean_i mean_t k3_it
    k3 = [(torch.exp(s.ref_logprobs - s.old_logprobs) - 1 + (s.old_logprobs - s.ref_logprobs)).mean() for s in samples]  # fmt: skip
    expected = -(a - a - a + a) / 4 + 0.04 * float(sum(k3)) / 4
    assert _loss(mb, g) == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_wiring():
    samples, mb, g = _group([1, 0, 0, 1], (1, 3, 2, 2), algo="dr_grpo", max_new_tokens=10)
    assert [float(s.advantages[0]) for s in samples] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert g[0].beta == 0.0 and g[0].aggregation == "seq_mean_token_sum_norm"
    # ratio 1, no KL: loss = -1/G sum_i (sum_t A_i) / max_new_tokens = -(0.5 - 1.5 - 1 + 1) / 40
    assert _loss(mb, g) == pytest.approx(1.0 / 40, abs=1e-6)


def test_dapo_wiring():
    samples, mb, g = _group([1, 0, 0, 1], (1, 3, 2, 2), algo="dapo")
    assert (g[0].clip_eps_low, g[0].clip_eps_high, g[0].dynamic_sampling) == (0.2, 0.28, True)
    assert g[0].overlong_buffer == 0.2
    a = 0.5 / math.sqrt(1 / 3)
    # token mean over all 8 tokens: -(1 * a - 3 * a - 2 * a + 2 * a) / 8 = 2a / 8
    assert _loss(mb, g) == pytest.approx(2 * a / 8, abs=1e-6)
    # clip-higher: with A > 0 the ratio counts up to 1.28 (not 1.2); beyond, the gradient is 0
    first = mb.old_logprobs.clone()
    first[0, 0] += math.log(1.25)  # completion 0 (A = +a) has one token
    assert _loss(mb, g, first) == pytest.approx((2 * a - 0.25 * a) / 8, abs=1e-6)
    first[0, 0] = mb.old_logprobs[0, 0] + math.log(1.5)
    assert _loss(mb, g, first) == pytest.approx((2 * a - 0.28 * a) / 8, abs=1e-6)
    # soft overlong penalty, a reward component: max 10 tokens, buffer 2 (0.2 x 10), scale 3:
    # 0 up to 8 tokens, then linear, -3 at 10
    cfg = GRPOConfig(algo="dapo", rewards=[{"name": "exact_match"}], sampling={"max_new_tokens": 10},
                     grpo={"overlong_penalty": 3.0})  # fmt: skip
    reward = grpo_reward(cfg)
    out = reward(["q"] * 4, ["1"] * 4, answer=["1"] * 4, completion_lengths=[5, 8, 9, 10])
    assert out.components["overlong"] == [0, 0, -0.5, -1]
    assert out.scores == pytest.approx([1, 1, 1 - 1.5, 1 - 3])


def test_rloo_wiring():
    samples, mb, g = _group([1, 0, 0, 1], (1, 3, 2, 2), algo="rloo", max_new_tokens=10)
    assert (g[0].beta, g[0].kl_in) == (0.05, "reward")
    # A_i = r_i - beta * KL_i - mean of the others' (r_j - beta * KL_j), KL_i = sum_t k1_it
    r = torch.tensor([1.0, 0, 0, 1]) - 0.05 * torch.stack([(s.old_logprobs - s.ref_logprobs).sum() for s in samples])  # fmt: skip
    expected = [float(r[i] - (r.sum() - r[i]) / 3) for i in range(4)]
    assert [float(s.advantages[0]) for s in samples] == pytest.approx(expected, abs=1e-5)
    # no KL term in the loss: sum_t A_i / 10 summed over the group, / G
    lengths = [1, 3, 2, 2]
    assert _loss(mb, g) == pytest.approx(-sum(a * n for a, n in zip(expected, lengths, strict=True)) / 40, abs=1e-6)  # fmt: skip


def test_reinforce_pp_wiring():
    samples, mb, g = _group([1, 0], (1, 3), algo="reinforce_pp", beta=0.0)
    # returns: the score at every token (gamma 1) -> [1, 0, 0, 0], whitened over the batch's
    # tokens: mean 0.25, var (0.75^2 + 3 * 0.25^2) / 4 = 0.1875
    std = math.sqrt(0.1875)
    expected = [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]
    got = torch.cat([s.advantages for s in samples]).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    assert _loss(mb, g) == pytest.approx(-sum(expected) / 4, abs=1e-5)  # token mean, about 0
    # with the KL in the reward, each token also gets -beta * k1_t before the returns
    samples, mb, g = _group([1, 0], (1, 3), algo="reinforce_pp")
    assert g[0].beta == 0.01 and g[0].kl_in == "reward"
    k1 = torch.cat([s.old_logprobs - s.ref_logprobs for s in samples])
    rewards = -0.01 * k1 + torch.tensor([1.0, 0, 0, 0])
    returns = torch.cat([rewards[:1], rewards[1:].flip(0).cumsum(0).flip(0)])
    whitened = (returns - returns.mean()) / returns.std(unbiased=False)
    got = torch.cat([s.advantages for s in samples])
    torch.testing.assert_close(got, whitened, atol=1e-4, rtol=0)


def test_algo_defaults_fill_only_unset_keys_and_typos_fail():
    cfg = load_config(GRPOConfig, overrides=["algo=dapo", "grpo.clip_eps_high=0.3"])
    assert cfg.grpo.clip_eps_high == 0.3  # set explicitly: kept
    assert cfg.grpo.aggregation == ALGOS["dapo"].aggregation
    with pytest.raises(ConfigError, match="did you mean 'grpo.group_size'"):
        load_config(GRPOConfig, overrides=["grpo.grup_size=4"])
    with pytest.raises(ConfigError, match="algo"):
        load_config(GRPOConfig, overrides=["algo=ppo"])


def test_task_prompts_hold_out_disjoint_prompts_and_the_task_scores_them():
    """With data.task set and no rewards, the task's own verifiers score (worked sums: the
    final field, not the whole completion)."""
    data = PromptDataConfig(task="arithmetic", train_size=300, eval_size=100,
                            task_options={"operators": "+", "worked": True})  # fmt: skip
    train, held_out = load_prompts(
        data, build_tokenizer(), chat=False, max_prompt_length=16, seed=0
    )
    assert len(train) == 300 and len(held_out) == 100
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert "answer" in train[0].fields and train[0].token_ids
    reward = task_reward(None, data)
    worked = train[0].fields["completion"]  # e.g. "7+8=15, 3+0+1=4, 45"
    out = reward(
        [train[0].text] * 2, [worked, worked + "1"], answer=[train[0].fields["answer"]] * 2
    )
    assert out.scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="rewards: not set"):
        task_reward(None, PromptDataConfig(train="prompts.jsonl"))


def test_scoring_sums_weighted_rewards_and_reports_components():
    reward = build_composite([{"name": "exact_match", "weight": 2.0}, {"name": "digit_match", "weight": 0.5}])  # fmt: skip
    prompt = Prompt(PromptRecord("50+03=", fields={"answer": "53"}), [1, 2], "test")
    rs = [Rollout(prompt, 0, [5, 3], text, "eos", torch.zeros(2), torch.ones(2, dtype=torch.bool))
          for text in ("53", "56")]  # fmt: skip
    score(rs, reward)
    assert rs[0].reward == pytest.approx(2.0 + 0.5) and rs[0].correct
    assert rs[1].reward == pytest.approx(0.25) and not rs[1].correct
    assert rs[1].components == {"exact_match": 0.0, "digit_match": 0.5}
