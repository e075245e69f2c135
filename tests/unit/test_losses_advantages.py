"""Advantages and returns against hand-worked numbers, plus their defining properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.losses import (
    gae,
    grpo_advantages,
    kl_penalty_rewards,
    masked_whiten,
    process_advantages,
    reinforce_plus_plus_advantages,
    returns_to_go,
    rloo_advantages,
    score_at_last_token,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_with_kl_shaping_and_score_at_last_token():
    # gamma = 0.9, lam = 0.8, three valid tokens then padding (whose 7.0 and 5.0 are ignored)
    # rewards r = token_rewards + score at t = 2: (0.0, 0.1, -0.2 + 1.0) = (0.0, 0.1, 0.8)
    # delta_2 = 0.8 + 0.9 * 0 - 2.0 = -1.2                    A_2 = -1.2
    # delta_1 = 0.1 + 0.9 * 2.0 - 1.0 = 0.9                   A_1 = 0.9 + 0.72 * -1.2 = 0.036
    # delta_0 = 0.0 + 0.9 * 1.0 - 0.5 = 0.4                   A_0 = 0.4 + 0.72 * 0.036 = 0.42592
    # returns = A + V = (0.92592, 1.036, 0.8)
    values = t([0.5, 1.0, 2.0, 7.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    token_rewards = t([0.0, 0.1, -0.2, 5.0])
    advantages, returns = gae(
        values, mask, scores=t(1.0), token_rewards=token_rewards, gamma=0.9, lam=0.8
    )
    torch.testing.assert_close(advantages, t([0.42592, 0.036, -1.2, 0.0]))
    torch.testing.assert_close(returns, t([0.92592, 1.036, 0.8, 0.0]))


def test_gae_reads_kl_penalty_rewards():
    # log r = (0.5, -1.0); k1 penalty with kl_coef 0.1: (-0.05, 0.1); score 1.0 at the last token
    # gamma = lam = 1, V = 0: A_1 = 0.1 + 1.0 = 1.1, A_0 = -0.05 + 1.1 = 1.05
    penalty = kl_penalty_rewards(t([-1.0, -2.0]), t([-1.5, -1.0]), torch.ones(1, 2), kl_coef=0.1)
    torch.testing.assert_close(penalty, t([-0.05, 0.1]))
    advantages, _ = gae(
        torch.zeros(1, 2, dtype=torch.float64),
        torch.ones(1, 2),
        scores=t(1.0),
        token_rewards=penalty,
        gamma=1.0,
        lam=1.0,
    )
    torch.testing.assert_close(advantages, t([1.05, 1.1]))


def test_gae_skips_masked_tokens_inside_a_sequence():
    # A tool output at t = 1 is masked: the recursion jumps from t = 0 to t = 2.
    # gamma = lam = 1, score 1.0 at t = 2: A_2 = 1.0 - 2.0 = -1.0
    # delta_0 = 0 + V_2 - V_0 = 2.0 - 1.0 = 1.0; A_0 = 1.0 + -1.0 = 0.0
    values = t([1.0, 99.0, 2.0])
    advantages, returns = gae(values, torch.tensor([[1, 0, 1]]), scores=t(1.0), gamma=1, lam=1)
    torch.testing.assert_close(advantages, t([0.0, 0.0, -1.0]))
    torch.testing.assert_close(returns, t([1.0, 0.0, 1.0]))


def test_returns_to_go():
    # gamma = 0.5: G_2 = 4, G_1 = 2 + 0.5 * 4 = 4, G_0 = 1 + 0.5 * 4 = 3 (t = 3 is padding)
    returns = returns_to_go(t([1.0, 2.0, 4.0, 8.0]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(returns, t([3.0, 4.0, 4.0, 0.0]))


def test_score_at_last_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    placed = score_at_last_token(t(2.0, -1.0, 5.0), mask)
    # the empty third sequence gets nothing
    torch.testing.assert_close(placed, t([0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]))


def test_masked_whiten():
    # unmasked (1, 2, 3): mean 2, population var (1 + 0 + 1) / 3 = 2/3, std 0.816497
    # whitened: (-1, 0, 1) / 0.816497 = (-1.224745, 0, 1.224745)
    values, mask = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([[1, 1, 1, 0]])
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(masked_whiten(values, mask), t([-1 / std, 0.0, 1 / std, 0.0]))
    # shift_mean=False adds the mean back: (0.775255, 2.0, 3.224745)
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), t([2 - 1 / std, 2.0, 2 + 1 / std, 0.0])
    )


def test_grpo_and_dr_grpo():
    rewards = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; A = +-0.5 / 0.57735 = +-0.866
    # group 1: all equal, A = 0
    a = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(grpo_advantages(rewards, group_size=4, eps=0.0)[:4], t(a, -a, -a, a))
    torch.testing.assert_close(grpo_advantages(rewards, group_size=4)[4:], t(0.0, 0.0, 0.0, 0.0))
    # Dr. GRPO: r - mean only
    torch.testing.assert_close(
        grpo_advantages(rewards, group_size=4, scale_by_std=False),
        t(0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0),
    )


def test_rloo():
    # i0: 1 - (0 + 0 + 1) / 3 = 2/3; i1: 0 - (1 + 0 + 1) / 3 = -2/3
    torch.testing.assert_close(
        rloo_advantages(t(1.0, 0.0, 0.0, 1.0), group_size=4),
        t(2 / 3, -2 / 3, -2 / 3, 2 / 3),
    )
    # group of 2 with rewards 3, 1: (3 - 1, 1 - 3) = (2, -2)
    torch.testing.assert_close(rloo_advantages(t(3.0, 1.0), group_size=2), t(2.0, -2.0))


def test_group_size_errors():
    with pytest.raises(ValueError, match="do not split into groups of group_size=3"):
        grpo_advantages(t(1.0, 2.0, 3.0, 4.0), group_size=3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(t(1.0, 2.0), group_size=1)


def test_reinforce_plus_plus():
    # four one-token sequences, scores (1, 0, 1, 1)
    # plain: mean 0.75, var (3 * 0.0625 + 0.5625) / 4 = 0.1875, std 0.433013
    #   A = (0.25, -0.75, 0.25, 0.25) / 0.433013 = (0.57735, -1.73205, 0.57735, 0.57735)
    # baseline (groups of 2): scores - group mean = (0.5, -0.5, 0, 0), mean 0, var 0.125
    #   A = (0.5, -0.5, 0, 0) / 0.353553 = (1.414214, -1.414214, 0, 0)
    scores, mask = t(1.0, 0.0, 1.0, 1.0), torch.ones(4, 1)
    plain = reinforce_plus_plus_advantages(scores, mask)
    torch.testing.assert_close(plain[:, 0], t(0.25, -0.75, 0.25, 0.25) / math.sqrt(0.1875))
    baseline = reinforce_plus_plus_advantages(scores, mask, group_size=2)
    torch.testing.assert_close(baseline[:, 0], t(2**0.5, -(2**0.5), 0.0, 0.0))


def test_reinforce_plus_plus_normalizes_over_every_token():
    # returns (1, 1, pad) and (0, 0, 0) with gamma = 1: tokens (1, 1, 0, 0, 0)
    # mean 0.4, var (2 * 0.36 + 3 * 0.16) / 5 = 0.24: A = 0.6 / 0.4899 = 1.2247, -0.4 / 0.4899
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = reinforce_plus_plus_advantages(t(1.0, 0.0), mask)
    hi, lo = 0.6 / math.sqrt(0.24), -0.4 / math.sqrt(0.24)
    torch.testing.assert_close(advantages, t([hi, hi, 0.0], [lo, lo, lo]))


def test_process_rewards_min_last_sum():
    # sequence 0: steps end at t = 1 (r = -0.5) and t = 3 (r = 0.3); 9.0 marks ignored values
    # sequence 1: no step at all -> zeros
    step_rewards = t([9.0, -0.5, 9.0, 0.3, 9.0], [9.0, 9.0, 9.0, 9.0, 9.0])
    step_mask = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    zeros = [0.0] * 5
    # min: min(-0.5, 0.3) = -0.5 on every token
    torch.testing.assert_close(
        process_advantages(step_rewards, step_mask, mask, "min"), t([-0.5] * 5, zeros)
    )
    # last: the last step's 0.3 on every token
    torch.testing.assert_close(
        process_advantages(step_rewards, step_mask, mask, "last"), t([0.3] * 5, zeros)
    )
    # sum: return-to-go over steps: t <= 1: -0.5 + 0.3 = -0.2; t in (1, 3]: 0.3; after: 0
    torch.testing.assert_close(
        process_advantages(step_rewards, step_mask, mask, "sum"),
        t([-0.2, -0.2, 0.3, 0.3, 0.0], zeros),
    )
    with pytest.raises(ValueError, match="unknown process reduction 'mean'"):
        process_advantages(step_rewards, step_mask, mask, "mean")


@st.composite
def masked_rows(draw, max_rows: int = 4, max_len: int = 8):
    rows = draw(st.integers(1, max_rows))
    length = draw(st.integers(1, max_len))
    cell = st.floats(-10.0, 10.0, allow_nan=False)

    def matrix(elements: st.SearchStrategy) -> list[list]:
        row = st.lists(elements, min_size=length, max_size=length)
        return draw(st.lists(row, min_size=rows, max_size=rows))

    scores = draw(st.lists(cell, min_size=rows, max_size=rows))
    return t(*matrix(cell)), t(*matrix(cell)), torch.tensor(matrix(st.booleans())), t(*scores)


@settings(max_examples=60, deadline=None)
@given(masked_rows())
def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value(data):
    token_rewards, values, mask, scores = data
    advantages, returns = gae(
        values, mask, scores=scores, token_rewards=token_rewards, gamma=1.0, lam=1.0
    )
    for i in range(mask.shape[0]):
        valid = [j for j in range(mask.shape[1]) if mask[i, j]]
        rewards = {j: token_rewards[i, j].item() for j in valid}
        if valid:
            rewards[valid[-1]] += scores[i].item()
        for j in range(mask.shape[1]):
            expected = sum(r for k, r in rewards.items() if k >= j) - values[i, j].item()
            assert advantages[i, j].item() == pytest.approx(
                expected if mask[i, j] else 0.0, abs=1e-9
            )
            assert returns[i, j].item() == pytest.approx(
                expected + values[i, j].item() if mask[i, j] else 0.0, abs=1e-9
            )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda g: st.tuples(
            st.just(g),
            st.lists(st.floats(-100.0, 100.0, allow_nan=False), min_size=g, max_size=4 * g).map(
                lambda r: r[: len(r) // g * g]
            ),
        )
    ),
    st.booleans(),
)
def test_group_advantages_sum_to_zero_in_each_group(group_and_rewards, scale_by_std):
    group_size, rewards = group_and_rewards
    rewards = t(*rewards)
    grpo = grpo_advantages(rewards, group_size, scale_by_std=scale_by_std)
    rloo = rloo_advantages(rewards, group_size)
    groups = rewards.reshape(-1, group_size)
    # float64 rounding of r - mean is about group_size * 2.2e-16 * max|r|; GRPO then divides
    # it by std + eps, which can be as small as eps = 1e-6 when a group's rewards are equal
    rounding = 4 * group_size * 2.2e-16 * (1.0 + groups.abs().amax(-1))
    scale = groups.std(-1) + 1e-6 if scale_by_std else torch.ones(len(groups))
    for advantages, tolerance in ((grpo, rounding / scale), (rloo, rounding)):
        sums = advantages.reshape(-1, group_size).sum(-1)
        assert (sums.abs() <= tolerance).all(), (sums, tolerance)
