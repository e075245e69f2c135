"""KL estimators, KL penalty and loss, and the KL controllers, against hand-worked numbers."""

import math

import pytest
import torch

from posttrain.losses import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss,
    kl_penalty_rewards,
)

LOGPROBS = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF_LOGPROBS = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)  # log r = (0.5, -1.0)


def test_estimators():
    # k1 = log r = (0.5, -1.0)
    torch.testing.assert_close(kl_estimate(LOGPROBS, REF_LOGPROBS, "k1"), LOGPROBS - REF_LOGPROBS)
    # k2 = 0.5 (log r)^2 = (0.125, 0.5)
    k2 = kl_estimate(LOGPROBS, REF_LOGPROBS, "k2")
    torch.testing.assert_close(k2, torch.tensor([[0.125, 0.5]], dtype=torch.float64))
    # k3 = e^-log r - 1 + log r = (e^-0.5 - 0.5, e^1 - 2) = (0.106531, 0.718282)
    k3 = kl_estimate(LOGPROBS, REF_LOGPROBS, "k3")
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2]], dtype=torch.float64)
    torch.testing.assert_close(k3, expected)
    assert k3[0, 0].item() == pytest.approx(0.106531, abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(LOGPROBS, REF_LOGPROBS, "k4")


def test_k1_and_k3_are_unbiased_over_the_policy():
    # E_{x ~ pi}[k(x)] = sum_x pi(x) k(x) must equal KL(pi || ref) = sum_x pi log(pi / ref)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    true_kl = (pi * (pi / ref).log()).sum()
    for kind in ("k1", "k3"):
        estimate = (pi * kl_estimate(pi.log(), ref.log(), kind)).sum()
        torch.testing.assert_close(estimate, true_kl)
    # k2 is biased: 0.5 E[(log r)^2] != KL here
    k2 = (pi * kl_estimate(pi.log(), ref.log(), "k2")).sum()
    assert abs(k2.item() - true_kl.item()) > 1e-3


def test_kl_penalty_rewards():
    # -0.1 * k1 = (-0.05, 0.1); the second token is masked -> 0
    mask = torch.tensor([[1, 0]])
    rewards = kl_penalty_rewards(LOGPROBS, REF_LOGPROBS, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0]], dtype=torch.float64))


def test_kl_loss():
    # k3 token mean: (0.106531 + 0.718282) / 2 = 0.412406
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = kl_loss(logprobs, REF_LOGPROBS, torch.ones(1, 2))
    assert loss.item() == pytest.approx((math.exp(-0.5) - 0.5 + math.e - 2) / 2)
    assert metrics["kl"].item() == pytest.approx(loss.item())
    # d k3 / d logp = 1 - e^-log r: (1 - e^-0.5, 1 - e^1) / 2 tokens
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[1 - math.exp(-0.5), 1 - math.e]], dtype=torch.float64) / 2
    torch.testing.assert_close(grad, expected)


def test_adaptive_controller():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 9/6 - 1 = 0.5, clipped to 0.2
    # beta = 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512 = 0.201024
    assert controller.update(current_kl=9.0, n_steps=256) == pytest.approx(0.201024)
    # KL 5.4: error 5.4/6 - 1 = -0.1; beta = 0.201024 * (1 - 0.1 * 256 / 10000) = 0.200509
    assert controller.update(current_kl=5.4, n_steps=256) == pytest.approx(0.201024 * 0.99744)
    assert controller.value == pytest.approx(0.200509, abs=1e-6)
    restored = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_controller():
    controller = FixedKLController(kl_coef=0.05)
    assert controller.update(current_kl=100.0, n_steps=256) == 0.05
    assert controller.value == 0.05
