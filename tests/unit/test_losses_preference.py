"""Preference losses against numbers worked out by hand (torchtune's rlhf/loss tests style)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.losses import (
    PAIR_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    pair_loss,
    robust_dpo_loss,
    simpo_loss,
)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two pairs shared by the DPO family.
# pair 0: h = (-1.0 - -1.5) - (-2.0 - -1.5) = 0.5 - -0.5 = 1.0
# pair 1: h = (-3.0 - -2.0) - (-1.0 - -2.0) = -1.0 - 1.0 = -2.0
POLICY_CHOSEN, POLICY_REJECTED = t(-1.0, -3.0), t(-2.0, -1.0)
REF_CHOSEN, REF_REJECTED = t(-1.5, -2.0), t(-1.5, -2.0)
PAIRS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def test_bradley_terry_with_margin_and_centering():
    chosen, rejected, margin = t(2.0, 0.5), t(1.0, 1.5), t(0.5, 0.0)
    # logits = r_c - r_r - m = (2.0 - 1.0 - 0.5, 0.5 - 1.5 - 0.0) = (0.5, -1.0)
    # -log sigmoid(x) = log(1 + e^-x): (log(1 + e^-0.5), log(1 + e^1.0)) = (0.474077, 1.313262)
    bt = (softplus(-0.5) + softplus(1.0)) / 2  # 0.893669
    loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin)
    assert loss.item() == pytest.approx(bt, abs=1e-6)
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    # centering: mean((r_c + r_r)^2) = (3.0^2 + 2.0^2) / 2 = 6.5, times 0.01 = 0.065
    loss, _ = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=0.01)
    assert loss.item() == pytest.approx(bt + 0.065, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(1.25)  # (2.0 + 0.5) / 2
    assert metrics["rewards/rejected"].item() == pytest.approx(1.25)  # (1.0 + 1.5) / 2
    assert metrics["rewards/margin"].item() == pytest.approx(0.0)  # (1.0 + -1.0) / 2
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)  # 2.0 > 1.0, 0.5 < 1.5


def test_dpo_sigmoid():
    loss, metrics = dpo_loss(*PAIRS, beta=0.1)
    # -log sigmoid(0.1 * 1.0) = 0.644397, -log sigmoid(0.1 * -2.0) = 0.798139
    expected = (softplus(-0.1) + softplus(0.2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.721268, abs=1e-6)
    # implicit rewards beta * (logp - ref): chosen (0.05, -0.1), rejected (-0.05, 0.1)
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.025)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.025)
    assert metrics["rewards/margin"].item() == pytest.approx(-0.05)  # (0.1 + -0.2) / 2
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)
    assert metrics["logps/chosen"].item() == pytest.approx(-2.0)
    assert not metrics["rewards/chosen"].requires_grad


def test_cdpo_label_smoothing():
    # eps = 0.1: 0.9 * -log sigmoid(beta h) + 0.1 * -log sigmoid(-beta h)
    # pair 0: 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    # pair 1: 0.9 * 0.798139 + 0.1 * 0.598139 = 0.778139
    loss, _ = dpo_loss(*PAIRS, beta=0.1, label_smoothing=0.1)
    pair0 = 0.9 * softplus(-0.1) + 0.1 * softplus(0.1)
    pair1 = 0.9 * softplus(0.2) + 0.1 * softplus(-0.2)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((0.654397 + 0.778139) / 2, abs=1e-6)


def test_robust_dpo():
    # (0.9 * -log sigmoid(beta h) - 0.1 * -log sigmoid(-beta h)) / (1 - 0.2)
    # pair 0: (0.9 * 0.644397 - 0.1 * 0.744397) / 0.8 = 0.631897
    loss, _ = robust_dpo_loss(*PAIRS, beta=0.1, label_smoothing=0.1)
    pair0 = (0.9 * softplus(-0.1) - 0.1 * softplus(0.1)) / 0.8
    pair1 = (0.9 * softplus(0.2) - 0.1 * softplus(-0.2)) / 0.8
    assert pair0 == pytest.approx(0.631897, abs=1e-6)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust_dpo_loss(*PAIRS, label_smoothing=0.5)


def test_ipo():
    # target margin 1 / (2 * 0.1) = 5: ((1 - 5)^2 + (-2 - 5)^2) / 2 = (16 + 49) / 2 = 32.5
    loss, _ = ipo_loss(*PAIRS, beta=0.1)
    assert loss.item() == pytest.approx(32.5)


def test_hinge():
    policy_chosen, policy_rejected = t(-1.0, -3.0, 0.0), t(-2.0, -1.0, -3.0)
    zeros = t(0.0, 0.0, 0.0)
    # h = (1.0, -2.0, 3.0); max(0, 1 - 0.5 h) = (0.5, 2.0, 0.0); mean = 2.5 / 3
    loss, _ = hinge_loss(policy_chosen, policy_rejected, zeros, zeros, beta=0.5)
    assert loss.item() == pytest.approx(2.5 / 3)


def test_pair_losses_registry_names_every_variant_and_reads_columns():
    """Columns are (chosen, rejected); ipo, simpo and orpo read per-token means."""
    policy, ref = torch.stack(PAIRS[:2], 1), torch.stack(PAIRS[2:], 1)
    ones = torch.ones_like(policy)
    assert pair_loss("dpo", policy, ref, ones, beta=0.1)[0].item() == pytest.approx(
        0.721268, abs=1e-6
    )
    assert pair_loss("ipo", policy, ref, ones, beta=0.1)[0].item() == pytest.approx(32.5)
    # lengths 2 halve every log-prob: IPO's margins halve, (1/2 - 5)^2 and (-1 - 5)^2
    assert pair_loss("ipo", policy, ref, 2 * ones, beta=0.1)[0].item() == pytest.approx(
        ((0.5 - 5) ** 2 + (-1 - 5) ** 2) / 2
    )
    swapped = pair_loss("dpo", policy.flip(1), ref.flip(1), ones, beta=0.1)[0].item()
    assert swapped != pytest.approx(0.721268, abs=1e-3)
    assert set(PAIR_LOSSES) == {"dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"}


def test_simpo():
    chosen_avg, rejected_avg = t(-0.5, -0.25), t(-1.0, -1.5)
    # logits = beta * avg_c - beta * avg_r - gamma with beta = 2, gamma = 1:
    # pair 0: -1.0 + 2.0 - 1 = 0.0 -> log 2 = 0.693147
    # pair 1: -0.5 + 3.0 - 1 = 1.5 -> log(1 + e^-1.5) = 0.201413
    loss, metrics = simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx((math.log(2) + softplus(-1.5)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((0.693147 + 0.201413) / 2, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.75)  # 2 * (-0.5 + -0.25) / 2
    assert metrics["rewards/accuracy"].item() == pytest.approx(1.0)


def test_orpo():
    # p = e^avg_logp; odds = p / (1 - p)
    # pair 0: p_c = 0.5 (odds 1), p_r = 0.2 (odds 1/4): log odds ratio = log 4
    #         -log sigmoid(log 4) = log(1 + 1/4) = 0.223144; nll = -log 0.5 = 0.693147
    # pair 1: p_c = 0.25 (odds 1/3), p_r = 0.5 (odds 1): log odds ratio = log(1/3)
    #         -log sigmoid(log 1/3) = log(1 + 3) = 1.386294; nll = -log 0.25 = 1.386294
    chosen_avg = t(math.log(0.5), math.log(0.25))
    rejected_avg = t(math.log(0.2), math.log(0.5))
    loss, metrics = orpo_loss(chosen_avg, rejected_avg, lam=0.1)
    nll = (math.log(2) + math.log(4)) / 2  # 1.039721
    odds_ratio_term = (math.log(1.25) + math.log(4)) / 2  # 0.804719
    assert loss.item() == pytest.approx(nll + 0.1 * odds_ratio_term, abs=1e-6)
    assert loss.item() == pytest.approx(1.120193, abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(nll)
    assert metrics["log_odds_ratio"].item() == pytest.approx((math.log(4) + math.log(1 / 3)) / 2)


def test_kto():
    policy, ref = t(-1.0, -2.0, -3.0), t(-2.0, -2.0, -1.0)  # r = (1.0, 0.0, -2.0)
    desirable = torch.tensor([True, False, False])
    # mismatched pairs: log ratios (0.5, 0.0, 0.3), z0 = max(0, 0.8 / 3) = 0.266667
    policy_kl, ref_kl = t(-1.0, -1.5, -2.0), t(-1.5, -1.5, -2.3)
    z0 = 0.8 / 3
    loss, metrics = kto_loss(
        policy,
        ref,
        desirable,
        policy_kl,
        ref_kl,
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=1.5,
    )
    # desirable:   1.0 * (1 - sigmoid(0.5 * (1.0 - z0)))      = 1 - sigmoid(0.366667)
    # undesirable: 1.5 * (1 - sigmoid(0.5 * (z0 - 0.0)))      = 1.5 * (1 - sigmoid(0.133333))
    # undesirable: 1.5 * (1 - sigmoid(0.5 * (z0 - -2.0)))     = 1.5 * (1 - sigmoid(1.133333))
    losses = [
        1 - sigmoid(0.5 * (1.0 - z0)),
        1.5 * (1 - sigmoid(0.5 * z0)),
        1.5 * (1 - sigmoid(0.5 * (z0 + 2.0))),
    ]
    assert loss.item() == pytest.approx(sum(losses) / 3, abs=1e-6)
    # (0.409347 + 0.700075 + 0.365321) / 3 = 0.491581
    assert loss.item() == pytest.approx(0.491581, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(z0)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)  # 0.5 * 1.0
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.5)  # 0.5 * (0 + -2) / 2


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref, desirable = t(-1.0), t(-1.0), torch.tensor([True])
    # mismatched log ratio -1.0 < 0, so z0 = 0 and loss = 1 - sigmoid(0) = 0.5
    loss, metrics = kto_loss(policy, ref, desirable, t(-2.0), t(-1.0), beta=0.1)
    assert metrics["kl"].item() == 0.0
    assert loss.item() == pytest.approx(0.5)


def test_gradcheck_dpo():
    inputs = [x.clone().requires_grad_() for x in PAIRS]
    for loss_fn in (dpo_loss, robust_dpo_loss, ipo_loss, hinge_loss):
        assert torch.autograd.gradcheck(lambda *x, f=loss_fn: f(*x, beta=0.3)[0], inputs)
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, label_smoothing=0.2)[0], inputs)


def test_gradcheck_kto():
    policy = t(-1.0, -2.0, -3.0).requires_grad_()
    ref = t(-2.0, -2.0, -1.0).requires_grad_()
    desirable = torch.tensor([True, False, False])
    kl_pairs = (t(-1.0, -1.5, -2.0), t(-1.5, -1.5, -2.3))

    def loss(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return kto_loss(p, r, desirable, *kl_pairs, beta=0.5, undesirable_weight=1.5)[0]

    assert torch.autograd.gradcheck(loss, (policy, ref))


def test_kto_reference_point_carries_no_gradient():
    policy_kl = t(-1.0, -1.5, -2.0).requires_grad_()
    loss, _ = kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), policy_kl, t(-1.5, -1.5, -2.3))
    assert not loss.requires_grad


finite = st.floats(-50.0, 0.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8), st.floats(0.01, 5.0))
def test_dpo_is_log_2_when_policy_equals_reference(pairs, beta):
    chosen, rejected = t(*[c for c, _ in pairs]), t(*[r for _, r in pairs])
    loss, metrics = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["rewards/margin"].item() == 0.0


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 5.0), st.floats(-20.0, 20.0), finite, finite)
def test_ipo_is_minimized_at_margin_one_over_two_beta(beta, other_margin, ref_c, ref_r):
    def loss_at(margin: float) -> torch.Tensor:
        chosen = torch.tensor([ref_c + margin], dtype=torch.float64, requires_grad=True)
        loss, _ = ipo_loss(chosen, t(ref_r), t(ref_c), t(ref_r), beta=beta)
        return loss, chosen

    best, chosen = loss_at(1 / (2 * beta))
    (grad,) = torch.autograd.grad(best, chosen)
    assert best.item() == pytest.approx(0.0, abs=1e-9)
    assert grad.item() == pytest.approx(0.0, abs=1e-6)
    assert loss_at(other_margin)[0].item() >= best.item()
