"""PPO recipe parts against hand-computed numbers: the per-token KL in the reward, GAE on the
right tokens, the shaped score, the ptx term, the critic's values at the right positions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.data.packing import pack
from posttrain.data.prompts import Prompt
from posttrain.data.records import PromptRecord
from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import FixedKLController
from posttrain.models.reward import RewardModel
from posttrain.online import Rollout, micro_batches, value_pass
from posttrain.recipes.ppo import (
    PPOState,
    advantages_and_returns,
    critic_loss,
    policy_loss,
    shaped_scores,
)
from posttrain.recipes.ppo_config import PPOConfig, PPOSection

CPU = torch.device("cpu")


def rollout(prompt_ids, token_ids, *, reward=0.0, finish="eos", **tensors) -> Rollout:
    n = len(token_ids)
    r = Rollout(
        Prompt(PromptRecord("p"), list(prompt_ids), "test"), 0, list(token_ids), "", finish,
        torch.zeros(n), torch.ones(n, dtype=torch.bool), reward=reward,
    )  # fmt: skip
    for name, values in tensors.items():
        setattr(r, name, torch.tensor(values))
    return r


def test_gae_puts_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    """Here's the maths (gamma 1, lambda 0.95, beta 0.5, score 1):
    k1 = old - ref = (0.1, -0.2, 0.3); r = -0.5 k1 + (0, 0, 1) = (-0.05, 0.1, 0.85)
    V = (0.5, 0.2, -0.1), V after the last token 0:
      delta_3 = 0.85 + 0 - (-0.1) = 0.95           A_3 = 0.95
      delta_2 = 0.1 + (-0.1) - 0.2 = -0.2          A_2 = -0.2 + 0.95 * 0.95 = 0.7025
      delta_1 = -0.05 + 0.2 - 0.5 = -0.35          A_1 = -0.35 + 0.95 * 0.7025 = 0.317375
    returns = A + V = (0.817375, 0.9025, 0.85); KL per completion 0.1 - 0.2 + 0.3 = 0.2."""
    r = rollout(
        [1, 2], [5, 6, 7], old_logprobs=[-1.0, -2.0, -0.5], ref_logprobs=[-1.1, -1.8, -0.8],
        values=[0.5, 0.2, -0.1],
    )  # fmt: skip
    p = PPOSection(gamma=1.0, lam=0.95, whiten_advantages=False)
    stats = advantages_and_returns([r], torch.tensor([1.0]), beta=0.5, p=p)
    torch.testing.assert_close(r.advantages, torch.tensor([0.317375, 0.7025, 0.95]))
    torch.testing.assert_close(r.returns, torch.tensor([0.817375, 0.9025, 0.85]))
    assert stats["kl"] == pytest.approx(0.2)
    assert stats["kl/token"] == pytest.approx(0.2 / 3)


def test_advantages_are_whitened_over_the_steps_tokens_and_sequences_stay_apart():
    a = rollout([1], [5, 6], old_logprobs=[0.0, 0.0], ref_logprobs=[0.0, 0.0], values=[0.0, 0.0])
    b = rollout([2], [7], old_logprobs=[0.0], ref_logprobs=[0.0], values=[0.0])
    # No KL, no values, gamma = lambda = 1: each token's advantage is its sequence's score.
    p = PPOSection(gamma=1.0, lam=1.0, whiten_advantages=False)
    advantages_and_returns([a, b], torch.tensor([2.0, -1.0]), beta=0.1, p=p)
    assert a.advantages.tolist() == [2.0, 2.0] and b.advantages.tolist() == [-1.0]
    advantages_and_returns([a, b], torch.tensor([2.0, -1.0]), beta=0.1, p=PPOSection(lam=1.0))
    # whitened over the 3 tokens (2, 2, -1): mean 1, population std sqrt(2)
    torch.testing.assert_close(a.advantages, torch.tensor([1.0, 1.0]) / 2**0.5, atol=1e-6, rtol=0)
    assert a.returns.tolist() == [2.0, 2.0]  # returns are not whitened


def test_scores_are_normalised_by_the_first_step_then_clipped_and_penalised():
    state = PPOState(FixedKLController(0.1))
    p = PPOSection(score_norm=True, score_clip=1.5, missing_eos_penalty=0.25)
    first = [rollout([1], [2], reward=x) for x in (1.0, 3.0)]  # mean 2, std 1
    torch.testing.assert_close(shaped_scores(first, state, p), torch.tensor([-1.0, 1.0]))
    later = [rollout([1], [2], reward=x, finish=f) for x, f in ((6.0, "eos"), (2.5, "length"))]
    # still mean 2, std 1: 4 -> clipped 1.5; 0.5 - 0.25 for the truncated one
    torch.testing.assert_close(shaped_scores(later, state, p), torch.tensor([1.5, 0.25]))
    assert state.state_dict() == {"beta": 0.1, "score_mean": 2.0, "score_std": 1.0}


def test_the_ptx_term_is_gamma_times_the_mean_nll_after_the_learners_division(tiny_qwen2):
    """The learner divides every micro-batch's sum by the minibatch's completion tokens
    (`total`); a ptx batch must come out as gamma x its mean NLL per target token."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.logprobs import nll_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    batch = pack([TokenizedExample([1, 5, 9, 4], [False, True, True, True])])
    loss, metrics = policy_loss(
        model, batch, total=40.0, p=PPOSection(), ptx=(0.5, 3), temperature=1.0
    )
    nll = nll_sum(model, batch).item() / 3
    assert loss.item() / 40.0 == pytest.approx(0.5 * nll, rel=1e-5)
    assert metrics["ptx/nll"].item() / 40.0 == pytest.approx(nll, rel=1e-5)


def test_critic_values_are_read_before_each_completion_token(tiny_qwen2):
    """V(s_t) is the head's score of the hidden state at the token that precedes completion
    token t: for a prompt (1, 2, 3) and completion (4, 5), the plain forward's scores at
    positions 2 and 3 of (1, 2, 3, 4, 5). Sibling completions share the prompt in the packed row."""
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2, num_labels=1)
    critic = RewardModel(classifier.eval())
    rs = [rollout([1, 2, 3], [4, 5]), rollout([1, 2, 3], [6, 7, 8])]
    value_pass(critic, rs, 16)
    for r in rs:
        ids = torch.tensor([r.prompt_ids + r.token_ids])
        with torch.no_grad():
            hidden = classifier.model(ids).last_hidden_state[0]
            plain = classifier.score(hidden)[:, 0]
        want = plain[len(r.prompt_ids) - 1 : -1]
        torch.testing.assert_close(r.values, want, atol=1e-5, rtol=0)


def test_the_critic_loss_is_zero_when_values_hit_their_returns(tiny_qwen2):
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2, num_labels=1)
    critic = RewardModel(classifier)
    r = rollout([1, 2], [3, 4, 5])
    value_pass(critic, [r], 16)
    r.returns = r.values.clone()
    (mb,) = micro_batches([r], 16, CPU)
    loss, metrics = critic_loss(critic, mb, p=PPOSection())
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    r.returns = r.values + torch.tensor([1.0, 0.0, -2.0])  # 0.5 x (1 + 0 + 4) = 2.5, a sum
    (mb,) = micro_batches([r], 16, CPU)
    loss, _ = critic_loss(critic, mb, p=PPOSection(value_clip_eps=None))
    assert loss.item() == pytest.approx(2.5, abs=1e-5)


def test_the_critic_needs_a_start_and_ptx_needs_data():
    with pytest.raises(ValueError, match="critic.init=reward_model needs reward_model"):
        PPOConfig(model={"path": "m"})
    with pytest.raises(ValueError, match="ptx.coef is set but ptx.train"):
        PPOConfig(critic={"init": "policy"}, ptx={"coef": 1.0})


def test_process_rewards_join_the_token_that_ends_each_step():
    """Here's the maths (gamma = lambda = 1, no KL, values 0, process_weight 0.5): step scores
    0.8 on token 1 and 0.2 on token 3 of 4, sequence score 1 on the last token:
    r = (0, 0.4, 0, 0.1 + 1); returns-to-go = (1.5, 1.5, 1.1, 1.1)."""
    r = rollout([1], [5, 6, 7, 8], old_logprobs=[0.0] * 4, ref_logprobs=[0.0] * 4, values=[0.0] * 4)
    p = PPOSection(gamma=1.0, lam=1.0, whiten_advantages=False, process_weight=0.5)
    steps = [torch.tensor([0.0, 0.8, 0.0, 0.2])]
    advantages_and_returns([r], torch.tensor([1.0]), beta=0.0, p=p, step_scores=steps)
    torch.testing.assert_close(r.returns, torch.tensor([1.5, 1.5, 1.1, 1.1]))
