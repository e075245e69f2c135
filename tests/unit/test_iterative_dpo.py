"""How iterative DPO turns one prompt's scored completions into a pair."""

from __future__ import annotations

import torch

from posttrain.data.prompts import Prompt
from posttrain.data.records import PromptRecord
from posttrain.online import Rollout
from posttrain.recipes.iterative_dpo import best_worst_pair


def scored(*rewards, truncated=(), skipped=(), blank=()):
    prompt = Prompt(PromptRecord("p"), [1], "test")
    return [
        Rollout(
            prompt,
            0,
            [1],
            " " if i in blank else f"answer {i}",
            "length" if i in truncated else "stop",
            torch.zeros(1),
            torch.ones(1, dtype=torch.bool),
            reward=r,
            skipped=i in skipped,
        )  # fmt: skip
        for i, r in enumerate(rewards)
    ]


def test_best_and_worst_first_on_ties():
    # rewards 0.2, 1.0, 0.0, 1.0, 0.0: best 1.0 first at 1, worst 0.0 first at 2
    assert best_worst_pair(scored(0.2, 1.0, 0.0, 1.0, 0.0)) == (1, 2)


def test_no_pair_when_all_agree():
    assert best_worst_pair(scored(1.0, 1.0, 1.0)) is None


def test_truncated_is_never_chosen_but_may_be_rejected():
    # the 1.0 at 0 was cut at max_new_tokens: best choosable is 0.5 at 1; worst is 0.0 at 2
    assert best_worst_pair(scored(1.0, 0.5, 0.0, truncated={0})) == (1, 2)
    # a truncated worst completion is still the rejected one
    assert best_worst_pair(scored(1.0, 0.5, 0.0, truncated={2})) == (0, 2)
    # everything truncated: nothing to choose
    assert best_worst_pair(scored(1.0, 0.0, truncated={0, 1})) is None
    # the only choosable completion is the worst: no pair
    assert best_worst_pair(scored(1.0, 0.0, truncated={0})) is None


def test_chosen_truncated_lets_it_be_chosen():
    assert best_worst_pair(scored(1.0, 0.5, 0.0, truncated={0}), chosen_truncated=True) == (0, 2)


def test_skipped_scores_take_no_part():
    # the NaN at 0 failed under the 'skip' fallback; 2 at 3 is best, -1 at 1 is worst
    assert best_worst_pair(scored(float("nan"), -1.0, 0.5, 2.0, skipped={0})) == (3, 1)
    assert best_worst_pair(scored(float("nan"), 1.0, skipped={0})) is None


def test_blank_completions_take_no_part():
    # the eos-at-once answer at 2 scored lowest, but DPO data holds no empty answer: 1 is worst
    assert best_worst_pair(scored(1.0, 0.5, 0.0, blank={2})) == (0, 1)
