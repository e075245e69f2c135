"""Policy, value and entropy losses, and the aggregation modes, against hand-worked numbers."""

import math

import pytest
import torch

from posttrain.losses import (
    aggregate_loss,
    entropy_from_logits,
    ppo_policy_loss,
    token_entropy,
    value_loss,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def log_ratios(*ratios: float) -> torch.Tensor:
    return torch.log(torch.tensor([ratios], dtype=torch.float64))


def test_aggregation_modes():
    losses = t([1.0, 2.0, 3.0], [4.0, 99.0, 99.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert aggregate_loss(losses, mask, "token_mean").item() == pytest.approx(2.5)
    # seq_mean_token_mean: mean((1 + 2 + 3) / 3, 4 / 1) = (2 + 4) / 2 = 3.0
    assert aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # seq_mean_token_sum_norm with norm_length 4: mean(6 / 4, 4 / 4) = 1.25
    dr_grpo = aggregate_loss(losses, mask, "seq_mean_token_sum_norm", norm_length=4)
    assert dr_grpo.item() == pytest.approx(1.25)
    # a global denominator, e.g. 8 tokens over two micro-batches: 10 / 8
    assert aggregate_loss(losses, mask, denominator=8).item() == pytest.approx(1.25)


def test_aggregation_leaves_out_sequences_without_tokens():
    losses, mask = t([2.0, 4.0], [7.0, 7.0]), torch.tensor([[1, 1], [0, 0]])
    # only sequence 0 counts: (2 + 4) / 2 = 3
    assert aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)


def test_aggregation_errors_name_the_problem():
    losses, mask = t([1.0]), torch.ones(1, 1)
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_mean'.*token_mean"):
        aggregate_loss(losses, mask, "seq_mean")
    with pytest.raises(ValueError, match="needs norm_length"):
        aggregate_loss(losses, mask, "seq_mean_token_sum_norm")


def test_ppo_clipped_surrogate():
    # ratios (1.0, 1.5, 0.5, 1.1), advantages (1, 1, -1, -1), eps = 0.2
    # t0: max(-1 * 1.0, -1 * 1.0) = -1.0
    # t1: max(-1 * 1.5, -1 * 1.2) = -1.2   (clipped)
    # t2: max( 1 * 0.5,  1 * 0.8) =  0.8   (clipped)
    # t3: max( 1 * 1.1,  1 * 1.1) =  1.1
    # token_mean = (-1.0 - 1.2 + 0.8 + 1.1) / 4 = -0.075
    logprobs = log_ratios(1.0, 1.5, 0.5, 1.1)
    advantages = t([1.0, 1.0, -1.0, -1.0])
    loss, metrics = ppo_policy_loss(
        logprobs, torch.zeros_like(logprobs), advantages, torch.ones(1, 4)
    )
    assert loss.item() == pytest.approx(-0.075)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    # approx_kl = mean(r - 1 - log r)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.0, 1.5, 0.5, 1.1)) / 4
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl)
    assert metrics["ratio_mean"].item() == pytest.approx(1.025)  # (1 + 1.5 + 0.5 + 1.1) / 4


def test_ppo_clip_higher_is_asymmetric():
    # eps_low = 0.2, eps_high = 0.28, all advantages +1:
    # r = 1.25: within 1.28, loss -1.25;  r = 1.5: clipped to -1.28;  r = 0.7: -0.7 (min wins)
    logprobs = log_ratios(1.25, 1.5, 0.7)
    loss, metrics = ppo_policy_loss(
        logprobs,
        torch.zeros_like(logprobs),
        t([1.0, 1.0, 1.0]),
        torch.ones(1, 3),
        clip_eps_low=0.2,
        clip_eps_high=0.28,
    )
    assert loss.item() == pytest.approx((-1.25 - 1.28 - 0.7) / 3)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    # with A = -1 the low side clips: r = 0.7 -> max(0.7, 0.8) = 0.8
    loss, _ = ppo_policy_loss(
        logprobs,
        torch.zeros_like(logprobs),
        t([-1.0, -1.0, -1.0]),
        torch.ones(1, 3),
        clip_eps_low=0.2,
        clip_eps_high=0.28,
    )
    assert loss.item() == pytest.approx((1.25 + 1.5 + 0.8) / 3)


def test_ppo_dual_clip_caps_negative_advantages():
    # c = 3. t0: A = -1, r = 5: max(5, 1.2) = 5, capped at -A c = 3
    #        t1: A = +1, r = 5: max(-5, -1.2) = -1.2, untouched (A > 0)
    #        t2: A = -1, r = 2: max(2, 1.2) = 2 < 3, untouched
    logprobs = log_ratios(5.0, 5.0, 2.0)
    advantages = t([-1.0, 1.0, -1.0])
    loss, metrics = ppo_policy_loss(
        logprobs, torch.zeros_like(logprobs), advantages, torch.ones(1, 3), dual_clip=3.0
    )
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip must be a constant > 1"):
        ppo_policy_loss(logprobs, logprobs, advantages, torch.ones(1, 3), dual_clip=0.5)


def test_ppo_per_sequence_advantages_broadcast_to_tokens():
    logprobs = log_ratios(1.0, 1.5, 0.5, 1.1).reshape(2, 2)
    per_token = t([1.0, 1.0], [-1.0, -1.0])
    mask = torch.ones(2, 2)
    by_token, _ = ppo_policy_loss(logprobs, torch.zeros_like(logprobs), per_token, mask)
    by_seq, _ = ppo_policy_loss(logprobs, torch.zeros_like(logprobs), t(1.0, -1.0), mask)
    assert by_seq.item() == pytest.approx(by_token.item())
    assert by_seq.item() == pytest.approx(-0.075)


def test_gspo_sequence_ratio():
    # seq 0: token log-ratios (0.3, -0.3): s = exp(mean) = exp(0) = 1.0, A = +1 -> loss -1.0
    #        (token level would clip e^0.3 = 1.35 to 1.2: (-1.2 - e^-0.3) / 2 = -0.9704)
    # seq 1: token log-ratios (0.2, 0.4, pad): s = exp(0.3) = 1.35 > 1.2, A = +1 -> -1.2
    # seq_mean_token_mean: (-1.0 + -1.2) / 2 = -1.1
    logprobs = t([0.3, -0.3], [0.2, 0.4]).requires_grad_()
    advantages = t(1.0, 1.0)
    mask = torch.ones(2, 2)
    loss, metrics = ppo_policy_loss(
        logprobs,
        torch.zeros_like(logprobs),
        advantages,
        mask,
        ratio_level="sequence",
        agg="seq_mean_token_mean",
    )
    assert loss.item() == pytest.approx(-1.1)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)  # seq 1's two tokens
    # gradient: seq 0 unclipped, d/dlogp_t of mean_t(-A s) / 2 sequences = -1 * s / 2 / 2 = -0.25
    # (GSPO-token: each token carries s * grad log pi_t); seq 1 clipped: 0
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t([-0.25, -0.25], [0.0, 0.0]))
    token_loss, _ = ppo_policy_loss(
        logprobs, torch.zeros_like(logprobs), advantages, mask, agg="seq_mean_token_mean"
    )
    assert token_loss.item() == pytest.approx(((-1.2 - math.exp(-0.3)) / 2 - 1.2) / 2)


def test_ppo_rejects_unknown_ratio_level():
    x = t([0.0])
    with pytest.raises(ValueError, match="unknown ratio_level 'seq'"):
        ppo_policy_loss(x, x, x, torch.ones(1, 1), ratio_level="seq")


def test_value_loss_clipped():
    # eps = 0.2
    # t0: v 1.0, old 0.8, R 1.5: (1.0 - 1.5)^2 = 0.25; v_clip = 0.8 + 0.2 = 1.0 -> 0.25
    # t1: v 2.0, old 1.0, R 1.0: (2.0 - 1.0)^2 = 1.0;  v_clip = 1.2 -> 0.04; max = 1.0
    # t2: v 0.9, old 0.5, R 1.0: (0.9 - 1.0)^2 = 0.01; v_clip = 0.7 -> 0.09; max = 0.09
    # loss = 0.5 * (0.25 + 1.0 + 0.09) / 3 = 0.223333
    values, old_values, returns = t([1.0, 2.0, 0.9]), t([0.8, 1.0, 0.5]), t([1.5, 1.0, 1.0])
    loss, metrics = value_loss(values, old_values, returns, torch.ones(1, 3), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.34 / 3)
    assert metrics["value_clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["value_error"].item() == pytest.approx((0.25 + 1.0 + 0.01) / 3)
    # unclipped: 0.5 * (0.25 + 1.0 + 0.01) / 3
    loss, _ = value_loss(values, old_values, returns, torch.ones(1, 3), clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * 1.26 / 3)


def test_entropy_from_logits():
    # uniform over 2: log 2 = 0.693147; p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [50.0, -50.0]]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    expected = [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    torch.testing.assert_close(token_entropy(logits)[0, :2], torch.tensor(expected).double())
    entropy = entropy_from_logits(logits, mask)
    assert entropy.item() == pytest.approx(sum(expected) / 2)
    assert entropy.item() == pytest.approx((0.693147 + 0.562335) / 2, abs=1e-6)


def test_gradcheck_ppo_surrogate():
    # log-ratios chosen away from the clip boundaries, where the loss is not differentiable
    logprobs = t([0.05, 0.5, -0.5, 0.1], [1.5, -0.02, 0.3, -1.0]).requires_grad_()
    old = torch.zeros_like(logprobs)
    advantages = t([1.0, 2.0, -1.0, -0.5], [-1.0, 0.7, -2.0, 1.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    for adv, kwargs in (
        (advantages, {}),
        (advantages, {"clip_eps_high": 0.28, "dual_clip": 3.0}),
        (advantages, {"agg": "seq_mean_token_sum_norm", "norm_length": 4}),
        # GSPO, one advantage per sequence (s_0 = e^0.0375 inside the clip range; s_1 = e^0.593
        # with A = -1, where the unclipped term is the larger).
        # With per-token advantages GSPO-token's gradient is by design not the derivative of
        # the loss value, so gradcheck does not apply there.
        (t(1.0, -1.0), {"ratio_level": "sequence", "agg": "seq_mean_token_mean"}),
    ):
        assert torch.autograd.gradcheck(
            lambda lp, a=adv, kw=kwargs: ppo_policy_loss(lp, old, a, mask, **kw)[0], (logprobs,)
        )


def test_gradcheck_value_loss():
    # |values - old_values| is 0.3, 0.1, 0.4, 0.3, 0.15: away from the clip edge at 0.2
    values = t([1.0, 2.0, 0.9], [0.3, -0.15, 5.0]).requires_grad_()
    old_values, returns = t([0.7, 1.9, 0.5], [0.0, 0.0, 5.0]), t([1.5, 1.0, 1.0], [1.0, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, old_values, returns, mask, clip_eps=0.2)[0], (values,)
    )
