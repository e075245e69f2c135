"""Reward models: packed scores equal Hugging Face's plain forward, one forward per response,
the InstructGPT ranking loss by hand, data errors, and the scorers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.data.records import DataError, PreferenceRecord, RankingRecord
from posttrain.data.reward import RewardEncoder, collate_comparisons, tokenize_comparisons
from posttrain.data.splits import load_train_eval
from posttrain.models.loading import load_tokenizer
from posttrain.models.reward import load_reward_model
from posttrain.recipes.rm import pair_loss
from posttrain.rewards.reward_model import EnsembleRewardModel, RewardModelScorer
from tests.conftest import write_jsonl

RECORDS = [
    RankingRecord("Pick the best fruit.", ["apple pie", "a banana", "cherries!", "dates"]),
    PreferenceRecord([{"role": "user", "content": "Say hi"}], "hi there", "go away", margin=0.5),
    RankingRecord("Short one", ["yes", "no", "maybe so, perhaps"]),
]
LIMITS = dict(max_length=256, max_prompt_length=128)


def _setup(path, heads=("reward",), seed=0, chat=True):
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(path))
    model = load_reward_model(
        str(path), torch.device("cpu"), heads=list(heads), head_weights=[1.0] * len(heads),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model.eval()
    encoder = RewardEncoder(tokenizer, decoder=model.last_token, chat=chat)
    return model, encoder


def _plain_scores(model, encoder, comparisons):
    """Each sequence alone through the plain Hugging Face classifier forward."""
    plain = model.classifier
    rows = []
    for c in comparisons:
        for r in c.response_ids:
            ids, types = encoder.join(c.prompt_ids, r)
            extra = {} if types is None else {"token_type_ids": torch.tensor([types])}
            rows.append(plain(input_ids=torch.tensor([ids]), **extra).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_llama"])
def test_batched_scores_equal_the_plain_forward_of_each_sequence(arch, layout, request):
    model, encoder = _setup(request.getfixturevalue(arch), heads=("helpful", "harmless"))
    comparisons = tokenize_comparisons(encoder, RECORDS, source="t", heads=[], **LIMITS)
    rb = collate_comparisons(comparisons, encoder, layout)
    with torch.no_grad():
        scores = model(rb.batch, rb.last_index, rb.token_type_ids)
        plain = _plain_scores(model, encoder, comparisons)
    assert scores.shape == (4 + 2 + 3, 2)
    torch.testing.assert_close(scores, plain, atol=1e-5, rtol=0)
    assert scores.std() > 1e-3  # not trivially equal


def test_saved_config_lets_the_plain_forward_find_the_last_real_token(tiny_qwen2, tmp_path):
    """Right padding with the saved pad id: the plain forward scores the last real token."""
    model, encoder = _setup(tiny_qwen2, chat=False)  # no chat: responses end with eos
    comparisons = tokenize_comparisons(encoder, RECORDS[:1], source="t", heads=[], **LIMITS)
    model.classifier.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    rb = collate_comparisons(comparisons, encoder, "padded")
    assert (rb.batch.input_ids == encoder.pad_id).any()  # really padded
    with torch.no_grad():
        padded = reloaded(input_ids=rb.batch.input_ids, attention_mask=rb.batch.attention_mask)
        shared = collate_comparisons(comparisons, encoder, "shared")
        ours = model(shared.batch, shared.last_index)
    torch.testing.assert_close(padded.logits, ours, atol=1e-5, rtol=0)


def test_a_ranking_runs_one_forward_per_response_not_per_pair(tiny_qwen2):
    model, encoder = _setup(tiny_qwen2)
    ranking = RankingRecord("Rank these.", ["first answer", "second", "third one", "fourth"])
    (c,) = tokenize_comparisons(encoder, [ranking], source="t", heads=[], **LIMITS)
    assert len(c.pairs) == 6  # K(K-1)/2 pairs for K = 4
    calls, tokens = [], []
    backbone = model.classifier.model

    def count(module, args, kwargs, out):
        calls.append(1)
        tokens.append(out.last_hidden_state.shape[1])

    hook = backbone.register_forward_hook(count, with_kwargs=True)
    for layout in ("shared", "packed"):
        rb = collate_comparisons([c], encoder, layout)
        model(rb.batch, rb.last_index)
    hook.remove()
    prompt, responses = len(c.prompt_ids), [len(r) for r in c.response_ids]
    assert calls == [1, 1]  # one backbone pass for the whole ranking
    assert tokens[0] == prompt + sum(responses)  # shared: the prompt once, each response once
    assert tokens[1] == 4 * prompt + sum(responses)  # packed: each of the 4 sequences once
    pairs_expanded = 6 * 2 * prompt + sum(responses[i] + responses[j] for i, j, _, _ in c.pairs)
    assert tokens[1] < pairs_expanded / 2.5


def test_ranking_loss_weighs_each_comparison_once_as_instructgpt(tiny_qwen2):
    _, encoder = _setup(tiny_qwen2)
    records = [
        RankingRecord("p", ["aaa", "bb", "c"]),
        PreferenceRecord("q", "yes", "no", margin=0.5),
    ]
    rb = collate_comparisons(
        tokenize_comparisons(encoder, records, source="t", heads=[], **LIMITS), encoder, "shared"
    )
    scores = torch.tensor([[3.0], [1.0], [0.0], [0.2], [0.7]])
    # Ranking: mean of -log sigmoid over its 3 pairs, margins 2, 3, 1; the pair: 0.2 - 0.7 - 0.5
    nls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    by_hand = (nls(2.0) + nls(3.0) + nls(1.0)) / 3 + nls(-1.0)
    assert float(pair_loss(scores, rb, center_coef=0.0)) == pytest.approx(by_hand, rel=1e-6)
    # Centering adds 0.1 * the same per-comparison means of (r_w + r_l)^2.
    center = ((4.0**2 + 3.0**2 + 1.0**2) / 3 + 0.9**2) * 0.1
    assert float(pair_loss(scores, rb, center_coef=0.1)) == pytest.approx(
        by_hand + center, rel=1e-6
    )


def test_head_columns_rank_each_attribute_and_ties_train_nothing(tiny_qwen2):
    _, encoder = _setup(tiny_qwen2)
    record = RankingRecord(
        "p", ["x1", "x2", "x3"], fields={"helpful": [1, 1, 0], "harmless": None}, row=7
    )
    (c,) = tokenize_comparisons(
        encoder, [record], source="d.jsonl", heads=["helpful", "harmless"], **LIMITS
    )
    helpful = sorted((b, w) for b, w, h, _ in c.pairs if h == 0)
    harmless = sorted((b, w) for b, w, h, _ in c.pairs if h == 1)
    assert helpful == [(0, 2), (1, 2)]  # 0 and 1 tie: no pair between them
    assert harmless == [(0, 1), (0, 2), (1, 2)]  # no column: the row's order
    bad = RankingRecord("p", ["x1", "x2"], fields={"helpful": [1, "a"]}, row=3)
    with pytest.raises(DataError) as err:
        tokenize_comparisons(encoder, [bad], source="d.jsonl", heads=["helpful", "b"], **LIMITS)
    assert str(err.value).startswith("d.jsonl: row 3: field 'helpful': expected a list of 2")


def test_bad_rows_name_file_row_and_field(tiny_qwen2, tmp_path):
    bad = write_jsonl(
        tmp_path / "r.jsonl",
        [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["only one"]}],
    )
    with pytest.raises(DataError, match=r"r.jsonl: row 2: field 'responses': 1 response\(s\)"):
        load_train_eval(str(bad), kinds=("preference", "ranking"))
    _, encoder = _setup(tiny_qwen2)
    long = [PreferenceRecord("p", "short", "x" * 300, row=4)]
    with pytest.raises(DataError, match=r"t: row 4: field 'rejected': prompt \+ response is"):
        tokenize_comparisons(encoder, long, source="t", heads=[], **LIMITS)
    (c,) = tokenize_comparisons(
        encoder, [PreferenceRecord("p" * 200, "a" * 100, "b", row=1)], source="t", heads=[],
        max_length=120, max_prompt_length=150, truncate=True,
    )  # fmt: skip
    assert len(c.prompt_ids) + len(c.response_ids[0]) == 120  # the prompt lost its left part
    assert c.prompt_ids[-5:] == encoder.encode("p" * 200, "b")[0][-5:]


def test_scorer_matches_training_scores_groups_prompts_and_survives_long_input(
    tiny_qwen2, tmp_path
):
    model, encoder = _setup(tiny_qwen2, heads=("helpful", "harmless"))
    model.classifier.config.reward_head_weights = [0.25, 0.75]
    model.classifier.save_pretrained(tmp_path / "rm")
    encoder.tokenizer.save_pretrained(tmp_path / "rm")
    prompts = ["Pick one.", "Pick one.", "Other", "Pick one."]
    completions = ["apple", "banana split", "zzz", "cherry"]
    scorer = RewardModelScorer(str(tmp_path / "rm"), batch_size=3, device="cpu")
    out = scorer(prompts, completions)
    one_by_one = RewardModelScorer(str(tmp_path / "rm"), batch_size=1, device="cpu")
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        head, tail = encoder.encode(p, c)
        with torch.no_grad():
            expected.append(model.classifier(input_ids=torch.tensor([head + tail])).logits[0])
    expected = torch.stack(expected)
    torch.testing.assert_close(
        torch.tensor(out.components["harmless"]), expected[:, 1], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(out.scores), expected @ torch.tensor([0.25, 0.75]), atol=1e-5, rtol=0
    )
    assert one_by_one(prompts, completions).scores == pytest.approx(out.scores, abs=1e-5)
    reweighted = RewardModelScorer(str(tmp_path / "rm"), weights={"helpful": 1.0}, device="cpu")
    assert reweighted(prompts, completions).scores == pytest.approx(
        expected[:, 0].tolist(), abs=1e-5
    )
    short = RewardModelScorer(str(tmp_path / "rm"), max_length=64, device="cpu")
    long_prompt = "word " * 500
    (score,) = short([long_prompt], ["the answer"]).scores
    head, tail = encoder.encode(long_prompt, "the answer")
    with torch.no_grad():
        kept = model.classifier(input_ids=torch.tensor([(head + tail)[-64:]])).logits[0]
    assert score == pytest.approx(float(kept @ torch.tensor([0.25, 0.75])), abs=1e-5)


def test_ensemble_is_mean_minus_k_std_of_its_members(tiny_qwen2, tmp_path):
    paths = []
    for seed in (1, 2):
        model, encoder = _setup(tiny_qwen2, seed=seed)
        model.classifier.save_pretrained(tmp_path / f"rm{seed}")
        encoder.tokenizer.save_pretrained(tmp_path / f"rm{seed}")
        paths.append(str(tmp_path / f"rm{seed}"))
    prompts, completions = ["a", "b", "c"], ["x", "yy", "zzz"]
    a, b = (RewardModelScorer(p, device="cpu")(prompts, completions).scores for p in paths)
    out = EnsembleRewardModel(paths, k=2.0, device="cpu")(prompts, completions)
    for i in range(3):
        mean, std = (a[i] + b[i]) / 2, abs(a[i] - b[i]) / 2  # population std of two values
        assert out.components["mean"][i] == pytest.approx(mean, abs=1e-6)
        assert out.components["std"][i] == pytest.approx(std, abs=1e-6)
        assert out.scores[i] == pytest.approx(mean - 2.0 * std, abs=1e-6)
    assert max(out.components["std"]) > 1e-4
