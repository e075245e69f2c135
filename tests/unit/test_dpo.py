"""The DPO recipe's parts: shared-prefix exactness, per-answer log-probs, the reference (LoRA with
adapters disabled, the on-disk cache), tokenizing pairs and KTO's mismatched pairs, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from posttrain.config import ConfigError, load_config
from posttrain.data.packing import pack
from posttrain.data.pairs import PairBatch, PairExample, collate_pairs, tokenize_pairs
from posttrain.data.records import DataError, LabeledRecord, PreferenceRecord
from posttrain.data.tokenize import TokenizedExample
from posttrain.losses import PAIR_LOSSES, pair_loss
from posttrain.models.loading import load_causal_lm
from posttrain.models.reference import (
    Reference,
    directory_fingerprint,
    load_cached,
    save_cached,
    sequence_logprobs,
)
from posttrain.models.tiny import build_tokenizer
from posttrain.recipes.dpo import (
    DPOConfig,
    _kto,
    finish_metrics,
    precompute_reference,
    preference_loss,
)
from posttrain.train.distributed import Dist

CPU = Dist(0, 1, torch.device("cpu"))


def _examples(seed: int, n: int = 4) -> list[PairExample]:
    """Pairs with ragged prompts and answers of random byte tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    shapes = [(9, 5, 8), (3, 6, 2), (14, 4, 4), (1, 7, 3)][:n]
    return [PairExample(ids(p), (ids(c), ids(r)), desirable=i % 2 == 0) for i, (p, c, r) in enumerate(shapes)]  # fmt: skip


def _separate(examples: list[PairExample], ref: torch.Tensor) -> PairBatch:
    """The same pairs as plain packed `prompt + answer` sequences (prompt computed twice)."""
    shared = collate_pairs(examples, ref, packed=True, pad_id=259)
    sequences = [
        TokenizedExample(e.prompt + a, [False] * len(e.prompt) + [True] * len(a))
        for e in examples
        for a in e.answers
    ]
    return PairBatch(pack(sequences), shared.lengths, ref, shared.desirable)


def _loss_and_grads(model, mb: PairBatch, cfg: DPOConfig):
    model.zero_grad()
    loss, metrics = preference_loss(model, mb, cfg=cfg, reference=None)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss", sorted([*PAIR_LOSSES, "kto"]))
def test_shared_prefix_loss_and_gradients_equal_separate_sequences(loss, tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    examples = _examples(0)
    ref = -20 * torch.rand(len(examples), 2, generator=torch.Generator().manual_seed(1))
    cfg = DPOConfig(loss=loss, beta=0.5)
    shared = collate_pairs(examples, ref, packed=True, pad_id=259)
    padded = collate_pairs(examples, ref, packed=False, pad_id=259)
    plain = _separate(examples, ref)
    assert shared.batch.num_tokens < plain.batch.num_tokens  # each prompt computed once
    loss_s, metrics_s, grads_s = _loss_and_grads(model, shared, cfg)
    for other in (plain, padded):
        loss_o, metrics_o, grads_o = _loss_and_grads(model, other, cfg)
        torch.testing.assert_close(loss_s, loss_o, atol=1e-5, rtol=0)
        for key in metrics_s:
            torch.testing.assert_close(metrics_s[key], metrics_o[key], atol=1e-5, rtol=0)
        for a, b in zip(grads_s, grads_o, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads_s)


def test_sequence_logprobs_are_sums_of_full_softmax_log_probs(tiny_qwen2):
    """Per answer: sum over its tokens of log_softmax(logits)[token], from a plain forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    examples = _examples(2)
    got = sequence_logprobs(model, collate_pairs(examples, None, packed=True, pad_id=259).batch, 8)
    want = []
    for e in examples:
        for a in e.answers:
            ids = torch.tensor([e.prompt + a])
            logps = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            want.append(logps[torch.arange(len(targets)), targets][len(e.prompt) - 1 :].sum())
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)


def test_dpo_loss_by_hand_from_the_registry():
    """The recipe's pair loss; check DPO's arithmetic on two pairs of given log-probs.

    h = (logp_c - ref_c) - (logp_r - ref_r): pair 0: (-3 - -4) - (-5 - -4) = 1 - -1 = 2;
    pair 1: (-6 - -5) - (-2 - -3) = -1 - 1 = -2. beta = 0.5: -log sigmoid(1) = 0.313262,
    -log sigmoid(-1) = 1.313262; mean 0.813262. Rewards 0.5 * (1, -1) chosen, (-1, 1) rejected."""
    policy, ref = (
        torch.tensor([[-3.0, -5.0], [-6.0, -2.0]]),
        torch.tensor([[-4.0, -4.0], [-5.0, -3.0]]),
    )
    loss, metrics = pair_loss("dpo", policy, ref, torch.ones(2, 2), beta=0.5)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0)  # (0.5 + -0.5) / 2
    assert metrics["rewards/margin"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)


def test_rpo_adds_the_chosen_answers_per_token_nll(tiny_qwen2):
    """RPO = the pair loss + alpha * mean over pairs of -logp(chosen) / len(chosen); the recipe
    returns sums over the micro-batch's pairs, so the difference is n * alpha * that mean."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    examples = _examples(0)
    ref = torch.zeros(len(examples), 2)
    losses = {}
    for alpha in (0.0, 0.5):
        mb = collate_pairs(examples, ref, packed=True, pad_id=259)
        cfg = DPOConfig(loss="dpo", rpo_alpha=alpha)
        losses[alpha], metrics = preference_loss(model, mb, cfg=cfg, reference=None)
    logps = sequence_logprobs(model, mb.batch, 2 * len(examples)).view(-1, 2)
    lengths = torch.tensor([len(e.answers[0]) for e in examples], dtype=torch.float32)
    nll = -(logps[:, 0] / lengths).mean()
    torch.testing.assert_close(losses[0.5] - losses[0.0], len(examples) * 0.5 * nll)
    torch.testing.assert_close(metrics["nll/chosen"], len(examples) * nll.detach())
    with pytest.raises(ConfigError, match="0 for kto"):
        load_config(DPOConfig, None, ["loss=kto", "rpo_alpha=1"])


def test_kto_metrics_are_means_over_each_label():
    """Three completions, two desirable: log-ratios (1, -2, 3), beta 0.1, mismatched KL 0.
    rewards/chosen = 0.1 * (1 + -2) / 2 = -0.05; rewards/rejected = 0.1 * 3 = 0.3;
    accuracy: 1 > 0 (good, right), -2 < 0 (good, wrong), 3 > 0 (bad, wrong) -> 1/3."""
    policy = torch.tensor([[-1.0, -5.0], [-4.0, -5.0], [1.0, -5.0]])
    ref = torch.tensor([[-2.0, -5.0], [-2.0, -5.0], [-2.0, -5.0]])
    mb = PairBatch(None, torch.ones(3, 2), ref, torch.tensor([True, True, False]))
    _, shares = _kto(policy, ref, mb, DPOConfig(loss="kto", beta=0.1))
    m = finish_metrics({k: float(v) for k, v in shares.items()})
    assert m["rewards/chosen"] == pytest.approx(-0.05)
    assert m["rewards/rejected"] == pytest.approx(0.3)
    assert m["rewards/margin"] == pytest.approx(-0.35)
    assert m["logps/chosen"] == pytest.approx(-2.5)  # (-1 + -4) / 2
    assert m["rewards/accuracy"] == pytest.approx(1 / 3)


def test_lora_reference_with_adapters_disabled_equals_the_base_model(tiny_qwen2):
    base = load_causal_lm(str(tiny_qwen2), torch.device("cpu"))
    policy = load_causal_lm(str(tiny_qwen2), torch.device("cpu"), lora_r=4)
    with torch.no_grad():  # move the adapters away from zero, so they change the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = collate_pairs(_examples(3), None, packed=True, pad_id=259).batch
    via_adapters_off = Reference(policy).sequence_logprobs(batch, 8)
    via_separate = Reference(policy, separate=base).sequence_logprobs(batch, 8)
    torch.testing.assert_close(via_adapters_off, via_separate, atol=1e-5, rtol=0)
    with torch.no_grad():
        adapted = sequence_logprobs(policy, batch, 8)
    assert (adapted - via_separate).abs().max() > 1e-2, "the adapters must matter for this test"
    assert policy.training and any("lora" in n for n, _ in policy.named_parameters())


def test_full_model_reference_needs_a_separate_model(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    with pytest.raises(ValueError, match="needs a separate model"):
        Reference(model)


def test_reference_cache_miss_computes_and_saves_then_a_hit_skips_the_pass(tiny_qwen2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    splits = {"train": _examples(4), "eval": _examples(5, n=2)}
    cache = tmp_path / "cache" / "key.pt"
    kw = dict(cache_file=cache, micro_batch_size=3, packed=True, pad_id=259)
    first, hit = precompute_reference(splits, Reference(model, model), CPU, **kw)
    assert not hit and cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["key.pt"]  # no temporary file left
    batch = collate_pairs(splits["train"], None, packed=True, pad_id=259).batch
    with torch.no_grad():
        direct = sequence_logprobs(model, batch, 8).view(4, 2)
    torch.testing.assert_close(first["train"], direct, atol=1e-5, rtol=0)
    # A hit returns the saved numbers without a forward: a different model gives the same ones.
    other = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    torch.nn.init.normal_(other.lm_head.weight)
    second, hit = precompute_reference(splits, Reference(other, other), CPU, **kw)
    assert hit
    torch.testing.assert_close(second["train"], first["train"])
    # A file whose shapes do not match the data is a miss, recomputed with the model given.
    splits["train"] = splits["train"][:3]
    third, hit = precompute_reference(splits, Reference(other, other), CPU, **kw)
    assert not hit and third["train"].shape == (3, 2)
    assert (third["train"] - first["train"][:3]).abs().max() > 1e-3
    assert load_cached(cache)["train"].shape == (3, 2)


def test_directory_fingerprint_follows_contents(tmp_path):
    (tmp_path / "a").write_bytes(b"weights")
    before = directory_fingerprint(tmp_path)
    assert directory_fingerprint(tmp_path) == before
    (tmp_path / "a").write_bytes(b"weightz")
    assert directory_fingerprint(tmp_path) != before
    save_cached(tmp_path / "c" / "x.pt", {"t": torch.ones(2)})
    assert load_cached(tmp_path / "c" / "x.pt")["t"].tolist() == [1.0, 1.0]
    assert load_cached(tmp_path / "c" / "missing.pt") is None


def _tokenize(records, **kw):
    args = dict(source="pairs.jsonl", chat=False, kto=False, seed=0, max_length=32,
                max_prompt_length=16, truncate=False)  # fmt: skip
    return tokenize_pairs(build_tokenizer(), records, **{**args, **kw})


def test_tokenize_pairs_shares_the_prompt_and_ends_answers_with_eos():
    (e,) = _tokenize([PreferenceRecord("1+1=", "2", "3")])
    encode = lambda text: build_tokenizer()(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert e.prompt == encode("1+1=")
    assert e.answers == (encode("2") + [258], encode("3") + [258])  # 258: <|im_end|>, the eos


def test_tokenize_pairs_names_the_row_and_field_of_an_overlong_answer():
    records = [
        PreferenceRecord("1+1=", "2", "3", row=1),
        PreferenceRecord("q", "a", "b" * 40, row=2),
    ]
    with pytest.raises(
        DataError, match=r"pairs.jsonl: row 2: field 'rejected': prompt \+ rejected is 42"
    ):
        _tokenize(records)
    (_, long), *_ = [e.answers for e in _tokenize(records, truncate=True)][1:]
    assert len(long) == 31  # cut to max_length - prompt


def test_kto_pairs_each_completion_with_one_written_for_another_prompt():
    records = [LabeledRecord(f"p{i}=", f"c{i}", i % 3 == 0) for i in range(6)]
    examples = _tokenize(records, kto=True)
    own = [e.answers[0] for e in examples]
    assert [e.desirable for e in examples] == [i % 3 == 0 for i in range(6)]
    mismatched = [e.answers[1] for e in examples]
    assert sorted(map(tuple, mismatched)) == sorted(map(tuple, own))  # a permutation...
    assert all(m != o for m, o in zip(mismatched, own, strict=True))  # ...with no fixed point
    # pairs given to KTO become a desirable and an undesirable completion
    split = _tokenize([PreferenceRecord("a", "good", "bad")] * 2, kto=True)
    assert [e.desirable for e in split] == [True, False, True, False]


def test_config_resolves_beta_and_rejects_bad_values():
    assert DPOConfig(loss="simpo").beta == 2.0 and DPOConfig().beta == 0.1
    assert load_config(DPOConfig, None, ["loss=ipo", "beta=0.3"]).beta == 0.3
    with pytest.raises(ConfigError, match="'loss'"):
        load_config(DPOConfig, None, ["loss=dpoo"])
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        load_config(DPOConfig, None, ["label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="did you mean 'reference.mode'"):
        load_config(DPOConfig, None, ["reference.mdoe=online"])
