"""Padded and packed layouts give the same results, and masked positions never matter."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.losses import (
    aggregate_loss,
    entropy_from_logits,
    gae,
    kl_loss,
    kl_penalty_rewards,
    masked_whiten,
    pack,
    ppo_policy_loss,
    process_advantages,
    reinforce_plus_plus_advantages,
    returns_to_go,
    score_at_last_token,
    seq_count,
    seq_mean,
    seq_sum,
    to_tokens,
    unpack,
    value_loss,
)

CU_SEQLENS = torch.tensor([0, 2, 5, 6])


def test_unpack_and_pack():
    packed = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    (rows,) = unpack(CU_SEQLENS, packed)
    torch.testing.assert_close(rows, torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [6.0, 0, 0]]))
    torch.testing.assert_close(pack(CU_SEQLENS, rows)[0], packed)
    (mask_rows,) = unpack(CU_SEQLENS, torch.ones(1, 6, dtype=torch.bool))
    assert mask_rows.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match=r"cu_seqlens ends at 6 but the packed tensor holds 7"):
        unpack(CU_SEQLENS, torch.zeros(1, 7))


def test_per_sequence_reductions():
    packed = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 0]])  # e.g. the prompt token 3 and token 6 masked out
    # sums: (1 + 2, 4 + 5, nothing) = (3, 9, 0); counts (2, 2, 0); means (1.5, 4.5, 0)
    torch.testing.assert_close(seq_sum(packed, mask, CU_SEQLENS), torch.tensor([3.0, 9.0, 0.0]))
    assert seq_count(mask, CU_SEQLENS).tolist() == [2, 2, 0]
    torch.testing.assert_close(seq_mean(packed, mask, CU_SEQLENS), torch.tensor([1.5, 4.5, 0.0]))
    spread = to_tokens(torch.tensor([7.0, 8.0, 9.0]), mask, CU_SEQLENS)
    torch.testing.assert_close(spread, torch.tensor([[7.0, 7.0, 8.0, 8.0, 8.0, 9.0]]))
    # the padded layout: rows are sequences
    padded = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    padded_mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(seq_sum(padded, padded_mask), torch.tensor([3.0, 9.0]))


@st.composite
def batches(draw):
    """A padded batch `(B, T)` with garbage past each sequence's end, and its packed twin."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    width = max(lengths) + draw(st.integers(0, 2))
    b = len(lengths)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    within = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    mask = (torch.rand(b, width, generator=g) < 0.8) & within
    step_mask = (torch.rand(b, width, generator=g) < 0.4) & within

    def tokens(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(b, width, generator=g, dtype=torch.float64)

    padded = {
        "logprobs": tokens(0.5) - 1.0,
        "old_logprobs": tokens(0.5) - 1.0,
        "ref_logprobs": tokens(0.5) - 1.0,
        "advantages": tokens(),
        "values": tokens(),
        "old_values": tokens(),
        "returns": tokens(),
        "rewards": tokens(),
        "mask": mask,
        "step_mask": step_mask,
    }
    logits = torch.randn(b, width, 5, generator=g, dtype=torch.float64)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    seq_advantages = torch.randn(b, generator=g, dtype=torch.float64)
    packed = {k: v[within].reshape(1, -1) for k, v in padded.items()}
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    extra = {"logits": logits, "scores": scores, "seq_advantages": seq_advantages}
    return padded, packed, cu_seqlens, within, extra


def results(x: dict, extra: dict, logits: torch.Tensor, cu: torch.Tensor | None) -> dict:
    """Every token-level function on one layout; token-shaped outputs come back packed."""
    out = {}
    lp = x["logprobs"].clone().requires_grad_()
    values = x["values"].clone().requires_grad_()
    logits = logits.clone().requires_grad_()
    m = x["mask"]
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        common = {"agg": agg, "cu_seqlens": cu, "norm_length": 7.0}
        out[f"agg/{agg}"] = aggregate_loss(x["rewards"], m, agg, cu_seqlens=cu, norm_length=7.0)
        loss, metrics = ppo_policy_loss(lp, x["old_logprobs"], x["advantages"], m, **common)
        out[f"ppo/{agg}"] = loss
        out.update({f"ppo/{agg}/{k}": v for k, v in metrics.items()})
        loss, metrics = ppo_policy_loss(
            lp,
            x["old_logprobs"],
            extra["seq_advantages"],
            m,
            ratio_level="sequence",
            dual_clip=2.0,
            clip_eps_high=0.3,
            **common,
        )
        out[f"gspo/{agg}"] = loss
        out.update({f"gspo/{agg}/{k}": v for k, v in metrics.items()})
        out[f"value/{agg}"] = value_loss(values, x["old_values"], x["returns"], m, **common)[0]
        out[f"kl/{agg}"] = kl_loss(lp, x["ref_logprobs"], m, **common)[0]
        out[f"entropy/{agg}"] = entropy_from_logits(logits, m, **common)
    out["grad/logprobs"], out["grad/values"], out["grad/logits"] = torch.autograd.grad(
        sum(v for v in out.values() if v.requires_grad), (lp, values, logits)
    )
    out["seq_sum"] = seq_sum(x["rewards"], m, cu)
    out["seq_mean"] = seq_mean(x["rewards"], m, cu)
    out["kl_penalty"] = kl_penalty_rewards(x["logprobs"], x["ref_logprobs"], m, kl_coef=0.1)
    out["gae"] = gae(
        x["values"],
        m,
        scores=extra["scores"],
        token_rewards=x["rewards"],
        gamma=0.9,
        lam=0.8,
        cu_seqlens=cu,
    )
    out["returns_to_go"] = returns_to_go(x["rewards"], m, gamma=0.7, cu_seqlens=cu)
    out["score_at_last_token"] = score_at_last_token(extra["scores"], m, cu)
    out["whiten"] = masked_whiten(x["rewards"], m)
    out["reinforce++"] = reinforce_plus_plus_advantages(
        extra["scores"], m, token_rewards=x["rewards"], cu_seqlens=cu
    )
    for reduction in ("min", "last", "sum"):
        out[f"process/{reduction}"] = process_advantages(
            x["rewards"], x["step_mask"], m, reduction, cu_seqlens=cu
        )
    return out


def assert_same(a: dict, b: dict, to_packed) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left, right = a[key], b[key]
        pairs = zip(left, right, strict=True) if isinstance(left, tuple) else [(left, right)]
        for x, y in pairs:
            if x.shape != y.shape:
                x = to_packed(x)
            torch.testing.assert_close(x, y, msg=lambda m, k=key: f"{k}: {m}")


@settings(max_examples=40, deadline=None)
@given(batches())
def test_packed_and_padded_layouts_agree(batch):
    padded, packed, cu_seqlens, within, extra = batch
    packed_logits = extra["logits"][within][None]
    from_padded = results(padded, extra, extra["logits"], None)
    from_packed = results(packed, extra, packed_logits, cu_seqlens)
    assert_same(from_padded, from_packed, lambda x: x[within][None])


GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(GARBAGE), st.booleans())
def test_masked_positions_never_change_a_result(batch, garbage, use_packed):
    padded, packed, cu_seqlens, within, extra = batch
    x, cu, logits = (
        (packed, cu_seqlens, extra["logits"][within][None])
        if use_packed
        else (padded, None, extra["logits"])
    )
    masked = ~x["mask"]
    dirty = {
        k: v if k in ("mask", "step_mask") else v.masked_fill(masked, garbage) for k, v in x.items()
    }
    dirty_logits = logits.masked_fill(masked[..., None], garbage)
    clean = results(x, extra, logits, cu)
    spoiled = results(dirty, extra, dirty_logits, cu)
    assert_same(clean, spoiled, lambda t: t)
