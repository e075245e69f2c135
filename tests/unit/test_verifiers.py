"""Verifiers at inference and in training: the best-of-N estimators against hand-computed
values, step splitting, Monte-Carlo step labels on a scripted policy, and process rewards
reaching the tokens that end each step."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data.prompts import Prompt
from posttrain.data.records import DataError, PromptRecord
from posttrain.data.steps import collate_steps, encode_steps, load_step_records, split_steps
from posttrain.eval.best_of_n import (
    best_of_n,
    best_of_n_kl,
    majority_vote,
    pass_at_k,
    selection_weights,
)
from posttrain.models.tiny import build_tokenizer
from posttrain.online import Rollout, sample_groups, score, step_positions
from posttrain.recipes.grpo import advantages_of
from posttrain.recipes.grpo_config import GRPOConfig
from posttrain.recipes.prm import PRMConfig, monte_carlo_labels, outcome_pairs
from posttrain.rewards import build_composite
from posttrain.rewards.process import aggregate_steps
from posttrain.rollout import SamplingParams
from posttrain.rollout.interface import Completion, RolloutBatch
from tests.conftest import write_jsonl


def test_pass_at_k_matches_hand_computed_values():
    # n = 5 samples, c = 2 correct. pass@1 = c / n = 0.4.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # pass@2 = 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10 = 0.7.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@3 = 1 - C(3, 3) / C(5, 3) = 1 - 1 / 10 = 0.9; pass@4: only 3 wrong, so 1.
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(5, 2, 6)


def test_best_of_n_picks_by_score_with_exact_subset_probabilities():
    # Scores 0.1 < 0.5 < 0.9 (ranks 1, 2, 3 of n = 3). Best-of-2: C(r - 1, 1) / C(3, 2):
    # rank 1 never wins, rank 2 wins 1/3 (the subset {1, 2}), rank 3 wins 2/3.
    assert selection_weights([0.5, 0.9, 0.1], 2) == pytest.approx([1 / 3, 2 / 3, 0.0])
    # The top-scored answer is wrong, the middle one right: best-of-2 accuracy 1/3,
    # best-of-1 the plain mean 1/3, best-of-3 always picks the wrong top one.
    correct = [1.0, 0.0, 0.0]
    assert best_of_n([0.5, 0.9, 0.1], correct, 2) == pytest.approx(1 / 3)
    assert best_of_n([0.5, 0.9, 0.1], correct, 1) == pytest.approx(1 / 3)
    assert best_of_n([0.5, 0.9, 0.1], correct, 3) == 0.0
    # Ties share their ranks: two answers tied at the top of n = 3 each win
    # (C(1, 1) + C(2, 1)) / C(3, 2) / 2 = 1/2 of best-of-2.
    assert selection_weights([0.2, 0.7, 0.7], 2) == pytest.approx([0.0, 0.5, 0.5])
    # A 0/1 verifier picking among its own scores is pass@N.
    verdicts = [1.0, 0.0, 0.0, 1.0, 0.0]
    for N in range(1, 6):
        assert best_of_n(verdicts, verdicts, N) == pytest.approx(pass_at_k(5, 2, N))


def test_majority_vote_counts_answers_and_breaks_ties_evenly():
    answers = ["4", "4", "5", None]
    correct = [True, True, False, False]
    # N = 4: "4" has two votes, "5" one; the None does not vote.
    assert majority_vote(answers, correct, 4) == 1.0
    # N = 1: a lone sample votes for itself; the None scores 0: (1 + 1 + 0 + 0) / 4.
    assert majority_vote(answers, correct, 1) == 0.5
    # A tie between a right and a wrong answer counts half.
    assert majority_vote(["4", "5"], [True, False], 2) == 0.5
    # N = 2 of 4 by seeded draws: the exact value is P(both "4") + P("4","5" or "4",None tie
    # rules): pairs {44}: 1 -> 1; {4,5} x2 -> 0.5; {4,None} x2 -> 1; {5,None} -> 0: 4/6.
    assert majority_vote(answers, correct, 2, draws=4000) == pytest.approx(4 / 6, abs=0.03)


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 3 / 4)
    assert best_of_n_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def test_steps_split_after_each_separator_and_join_back():
    assert split_steps("7+8=15, 3+0+1=4, 45", ", ") == ["7+8=15, ", "3+0+1=4, ", "45"]
    assert split_steps("a\n\nb\n", "\n") == ["a\n\n", "b\n"]  # blank pieces join their step
    text = "x\ny\n\nz"
    assert "".join(split_steps(text, "\n")) == text


def test_step_ends_are_the_last_token_of_each_step():
    tok = build_tokenizer()
    ids, ends = encode_steps(tok, "1+2=", ["ab, ", "c"], chat=False)
    prompt = len(tok("1+2=", add_special_tokens=False)["input_ids"]) + (
        tok.bos_token_id is not None
    )
    assert ends == [prompt + 3, prompt + 4]  # "ab, " is 4 bytes, "c" one
    sb = collate_steps([(ids, ends), (ids[:-1], ends[:1])])
    assert sb.positions.tolist() == [ends[0], ends[1], len(ids) + ends[0]]
    assert sb.counts == [2, 1]


def test_step_label_files_name_the_row_and_field_of_a_bad_label(tmp_path):
    good = {"prompt": "p", "steps": ["a, ", "b"], "labels": [0.5, 1]}
    bad = {"prompt": "p", "steps": ["a, ", "b"], "labels": [0.5, 1.5]}
    path = write_jsonl(tmp_path / "labels.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"labels.jsonl: row 2: field 'labels\[1\]'.*\[0, 1\]"):
        load_step_records(path)
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "p", "steps": ["a"], "labels": []}])
    with pytest.raises(DataError, match="row 1: field 'labels': expected a list of 1"):
        load_step_records(short)
    assert load_step_records(write_jsonl(tmp_path / "ok.jsonl", [good]))[0].labels == [0.5, 1.0]


class ScriptedPolicy:
    """A policy whose continuations of `12+34=` depend on the prefix: after a wrong first step
    (`=7`) it never recovers; after the right one, 3 of every 4 continuations are right."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def continuations(self, text: str) -> list[str]:
        prefix = text.removeprefix("12+34=")
        if prefix == "":
            return ["2+4=6, 1+3=4, 46", "2+4=7, 1+3=4, 47"]
        if "=7" in prefix:
            return ["1+3=4, 47"] if prefix.count(",") == 1 else ["47"]
        if prefix.count(",") == 1:
            return ["1+3=4, 46", "1+3=4, 46", "1+3=4, 46", "1+3=5, 56"]
        return ["46"]

    def generate(self, prompt_ids, params: SamplingParams) -> RolloutBatch:
        completions = []
        for i, ids in enumerate(prompt_ids):
            options = self.continuations(self.tok.decode(ids, skip_special_tokens=True))
            for j in range(params.n):
                text = options[j % len(options)]
                tokens = self.tok(text, add_special_tokens=False)["input_ids"]
                tokens.append(self.tok.eos_token_id)
                completions.append(Completion(i, tokens, [0.0] * len(tokens), "eos", text))
        return RolloutBatch([list(p) for p in prompt_ids], completions, 0, 0, 0.0, 0.0)


def test_monte_carlo_step_labels_on_a_scripted_policy():
    tok = build_tokenizer()
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    prompt = Prompt(PromptRecord("12+34=", fields={"answer": "46"}), ids, "test")
    policy = ScriptedPolicy(tok)
    reward = build_composite(
        [{"name": "math", "options": {"extract": "full", "answer_pattern": r",\s*(-?\d+)\s*$"}}]
    )
    groups = sample_groups(policy, [prompt], SamplingParams(n=2))
    score(groups[0][1], reward)
    cfg = PRMConfig(labels={"separator": ", ", "rollouts_per_step": 4})
    rows = monte_carlo_labels(policy, groups, reward, ", ", tok, cfg, seed=0)
    right, wrong = rows
    assert right["steps"] == ["2+4=6, ", "1+3=4, ", "46"]
    # Step 1 right: 3 of 4 continuations reach 46; step 2 always does; the last step is the
    # solution's own verdict.
    assert right["labels"] == [0.75, 1.0, 1.0] and right["correct"]
    # A wrong first step: no continuation recovers.
    assert wrong["labels"] == [0.0, 0.0, 0.0] and not wrong["correct"]
    assert outcome_pairs(rows) == [
        {"prompt": "12+34=", "chosen": "2+4=6, 1+3=4, 46", "rejected": "2+4=7, 1+3=4, 47"}
    ]


def test_step_aggregates():
    assert aggregate_steps([0.9, 0.2, 0.8], "min") == 0.2
    assert aggregate_steps([0.5, 0.5], "prod") == 0.25
    assert aggregate_steps([0.9, 0.2, 0.8], "last") == 0.8
    assert aggregate_steps([0.9], "none") == 0.0
    with pytest.raises(ValueError, match="unknown step aggregate"):
        aggregate_steps([0.5], "max")


def _worked_rollout(tok, text: str, steps: list[tuple[int, float]], reward: float) -> Rollout:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = Prompt(PromptRecord("12+34="), [1, 2], "test")
    n = len(ids)
    return Rollout(prompt, 0, ids, text, "eos", torch.zeros(n), torch.ones(n, dtype=torch.bool),
                   reward=reward, step_scores=steps)  # fmt: skip


def test_process_rewards_reach_the_token_that_ends_each_step():
    tok = build_tokenizer()
    assert step_positions(tok, tok("ab, cd", add_special_tokens=False)["input_ids"], [4, 6]) == [
        3,
        5,
    ]
    # Two solutions of one group; the first's steps end at characters 7 and 16 ("2+4=6, " is
    # 7 bytes), the second's at 7 and 16 too. Step scores 0.9, 0.8 | 0.1, 0.2: group mean 0.5,
    # std sqrt(((.4^2) + (.3^2) + (.4^2) + (.3^2)) / 4) = 0.35355.
    a = _worked_rollout(tok, "2+4=6, 1+3=4, 46", [(7, 0.9), (16, 0.8)], reward=1.0)
    b = _worked_rollout(tok, "2+4=7, 1+3=4, 47", [(7, 0.1), (16, 0.2)], reward=0.0)
    g = GRPOConfig(algo="dr_grpo", grpo={"group_size": 2, "process": "sum"}).grpo
    adv_a, adv_b = advantages_of([a, b], [True, True], g, tok)
    std = math.sqrt((0.4**2 + 0.3**2 + 0.4**2 + 0.3**2) / 4)
    # Dr. GRPO outcome advantages: reward - group mean = +0.5 / -0.5 on every token.
    # Process ('sum'): tokens 0..6 (through step 1's end) get (0.4 + 0.3) / std, tokens
    # 7..15 get 0.3 / std, the rest (the final "46" and eos) 0.
    expected_a = torch.full((len(a.token_ids),), 0.5)
    expected_a[:7] += (0.4 + 0.3) / std
    expected_a[7:16] += 0.3 / std
    assert torch.allclose(adv_a, expected_a, atol=1e-4)
    expected_b = torch.full((len(b.token_ids),), -0.5)
    expected_b[:7] -= (0.4 + 0.3) / std
    expected_b[7:16] -= 0.3 / std
    assert torch.allclose(adv_b, expected_b, atol=1e-4)
    # Without step scores the process setting refuses to run.
    a.step_scores = b.step_scores = None
    with pytest.raises(ValueError, match="no reward scored steps"):
        advantages_of([a, b], [True, True], g, tok)


def test_prm_held_out_metrics_by_hand():
    from posttrain.data.steps import StepRecord
    from posttrain.recipes.prm import step_metrics

    records = [StepRecord("p", ["a", "b"], [1.0, 0.0]), StepRecord("q", ["c", "d"], [0.3, 0.0])]
    logits = torch.tensor([2.0, -1.0, 0.5, 0.5])  # hard labels: 1, 0, 1, 0
    metrics = step_metrics(logits, records, loss_sum=2.0)
    assert metrics["eval/loss"] == 0.5
    assert metrics["eval/step_accuracy"] == 0.75  # p > 0.5 for the last, a negative
    assert metrics["eval/majority_accuracy"] == 0.5
    # Positives {2, 0.5} against negatives {-1, 0.5}: 2 > both, 0.5 > -1, 0.5 ties 0.5.
    assert metrics["eval/step_auc"] == pytest.approx(3.5 / 4)
