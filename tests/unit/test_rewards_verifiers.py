"""Verifiers on known-good and known-bad answers: math, reasoning-gym, exact/regex/format,
length, overlong, repetition, sentiment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.rewards import build_reward, check_output
from posttrain.rewards.extraction import extract_answer, last_boxed
from posttrain.rewards.length import OverlongPenalty, RepetitionPenalty, TargetLengthReward
from posttrain.rewards.math_answer import MathReward


def score(fn, completions, **fields):
    output = fn(["prompt"] * len(completions), completions, **fields)
    return check_output(output, len(completions), fn.name)


# --- answer extraction ------------------------------------------------------------------------


def test_last_boxed_takes_the_last_box_with_balanced_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} and an unclosed \boxed{2") == "1"
    assert last_boxed("no box") is None


def test_extract_answer_by_tag_pattern_and_full_text():
    assert extract_answer("<answer>a</answer> <answer> b </answer>", "answer_tag") == "b"
    assert (
        extract_answer("The answer is 42. Later: the answer is 7.", pattern=r"answer is (\d+)")
        == "7"
    )
    assert extract_answer("  45 \n", "full") == "45"
    assert extract_answer("   ", "full") is None


# --- math-verify in a process pool -------------------------------------------------------------


@pytest.fixture(scope="module")
def math_reward():
    reward = MathReward(timeout_s=5.0)  # generous: a loaded 2-core machine
    yield reward
    reward.close()


def test_math_equivalent_forms_score_one_and_wrong_answers_zero(math_reward):
    completions = [
        r"so the answer is \boxed{1/2}",  # 1/2 == 0.5
        r"\boxed{1/3}",  # 1/3 != 0.5
        r"\boxed{\frac{1}{2}}",  # LaTeX fraction
        r"\boxed{1,234}",  # thousands separator
        "I think it is 0.5 but I will not box it",  # no answer: wrong, not an error
        r"\boxed{1235}",
        r"\boxed{0.5}",
    ]
    gold = ["0.5", "0.5", "0.5", "1234", "0.5", "1234", r"$\frac12$"]
    out = score(math_reward, completions, answer=gold)
    assert out.scores == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert out.components["has_answer"] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_math_answer_pattern_replaces_boxed_extraction():
    reward = MathReward(answer_pattern=r"####\s*(\S+)")
    try:
        out = score(reward, ["work... #### 12", r"\boxed{12}"], answer=["12", "12"])
    finally:
        reward.close()
    assert out.scores == [1.0, 0.0]


def test_math_hanging_check_times_out_scores_zero_and_the_worker_is_replaced(math_reward):
    # sympy tries to evaluate 9^(9^(9^9)) and never returns; math-verify's own alarm is off.
    restarts = math_reward.pool.restarts
    out = score(math_reward, [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"], answer=["1", "2"])
    assert out.scores == [0.0, 1.0]
    assert out.components["timed_out"] == [1.0, 0.0]
    assert out.metrics["reward/math/timeouts"] == 1.0
    assert math_reward.pool.restarts == restarts + 1
    assert score(math_reward, [r"\boxed{3}"], answer=["3"]).scores == [1.0]


def test_pool_workers_exit_when_their_parent_is_killed():
    # A run killed by SIGKILL never shuts its pool down; its workers must not linger as orphans.
    script = (
        "import os, time\n"
        "from posttrain.sandbox.deadline_pool import DeadlinePool\n"
        "print(*DeadlinePool(os.getpid, workers=2).run([(), ()]), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)

    def alive(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status")
        try:
            return "State:\tZ" not in status.read_text()  # a zombie has exited
        except FileNotFoundError:
            return False

    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert workers and all(alive(pid) and pid != parent.pid for pid in workers)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), "pool workers outlived their killed parent"


def test_math_without_gold_field_names_it():
    with pytest.raises(ValueError, match="'answer'"):
        MathReward()(["p"], [r"\boxed{1}"])


# --- text matching ---------------------------------------------------------------------------------


def test_exact_match_full_text_and_answer_tag():
    exact = build_reward("exact_match")
    assert score(exact, [" 45\n", "46", "45 "], answer=["45", "45", 45]).scores == [1.0, 0.0, 1.0]
    tagged = build_reward("exact_match", extract="answer_tag", ignore_case=True)
    out = score(tagged, ["<think>x</think><answer>Paris</answer>", "paris"], answer=["paris"] * 2)
    assert out.scores == [1.0, 0.0]  # the second has no <answer> block


def test_regex_search_and_fullmatch():
    assert score(build_reward("regex", pattern=r"\d{3}"), ["abc 123", "12"]).scores == [1.0, 0.0]
    full = build_reward("regex", pattern=r"yes|no", mode="fullmatch")
    assert score(full, ["yes", "yes sir"]).scores == [1.0, 0.0]


def test_format_reward_wants_think_then_answer_and_nothing_else():
    fmt = build_reward("format")
    good = "<think>\nstep 1\nstep 2\n</think>\n<answer>4</answer>"
    bad = [
        "<answer>4</answer>",
        "<think>x</think>",
        good + " trailing text",
        "<answer>4</answer><think>x</think>",
    ]
    assert score(fmt, [good, *bad]).scores == [1.0, 0.0, 0.0, 0.0, 0.0]


# --- reasoning-gym -------------------------------------------------------------------------------


def test_reasoning_gym_scores_its_own_entry_by_reference_and_by_value():
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("chain_sum", seed=3, size=5)
    entries = [dataset[i] for i in range(3)]
    reference = [
        {"dataset": "chain_sum", "config": {"seed": 3, "size": 5}, "index": i} for i in range(3)
    ]
    completions = [
        f"<think>adding</think><answer>{entries[0]['answer']}</answer>",
        f"<answer>{int(entries[1]['answer']) + 1}</answer>",
        f"the answer is {entries[2]['answer']}",  # no <answer> tag
    ]
    reward = build_reward("reasoning_gym")
    assert score(reward, completions, reasoning_gym=reference).scores == [1.0, 0.0, 0.0]
    assert score(reward, completions, entry=entries).scores == [1.0, 0.0, 0.0]


# --- length control ------------------------------------------------------------------------------


def test_target_length_is_linear_in_the_distance():
    reward = TargetLengthReward(target=10)
    # here's the maths: 1 - |n - 10| / 10 for n = 10, 5, 15, 30 -> 1, 0.5, 0.5, 0 (clipped)
    out = score(reward, ["x" * 10, "x" * 5, "x" * 15, "x" * 30])
    assert out.scores == [1.0, 0.5, 0.5, 0.0]
    words = TargetLengthReward(unit="words", scale=4)
    assert score(words, ["a b c", "a"], target_length=[3, 3]).scores == [1.0, 0.5]


def test_overlong_penalty_matches_dapo_eq_13():
    penalty = OverlongPenalty(max_length=20, cache_length=4)  # soft zone (16, 20]
    lengths = [10, 16, 17, 18, 20, 21]
    out = score(penalty, ["c"] * len(lengths), completion_lengths=lengths)
    # 0 up to 16; (16 - n) / 4 inside; -1 beyond 20
    assert out.scores == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert penalty.penalty(19) == pytest.approx(-0.75)


def test_overlong_in_tokens_needs_lengths_or_a_tokenizer():
    with pytest.raises(ValueError, match="completion_lengths"):
        OverlongPenalty(max_length=20, cache_length=4)(["p"], ["text"])


def test_repetition_penalty_counts_repeated_ngrams():
    penalty = RepetitionPenalty(n=2)
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5 -> -(1 - 2/5) = -0.6
    out = score(penalty, ["a b a b a b", "the cat sat on the mat", "short"])
    assert out.scores == pytest.approx([-0.6, 0.0, 0.0])


# --- sentiment ------------------------------------------------------------------------------------


def test_sentiment_positive_beats_negative():
    reward = build_reward("sentiment")
    out = score(reward, ["What a wonderful, happy day!", "This is terrible and I hate it."])
    assert out.scores[0] > 0.5
    assert out.scores[1] < -0.5
    flipped = build_reward("sentiment", target="negative")
    assert score(flipped, ["What a wonderful, happy day!"]).scores[0] == -out.scores[0]


def test_sentiment_with_a_threshold_is_a_pass_fail_verifier():
    texts = ["What a wonderful, happy day!", "a fine day.", "This is terrible and I hate it."]
    compound = score(build_reward("sentiment"), texts).scores
    assert compound[0] > 0.5 and 0 < compound[1] < 0.5 and compound[2] < 0  # VADER's own scores
    verdicts = score(build_reward("sentiment", threshold=0.5), texts).scores
    assert verdicts == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="threshold"):
        build_reward("sentiment", threshold=2)


def test_digit_match_gives_partial_credit_right_aligned():
    from posttrain.rewards import build_reward

    digit_match = build_reward("digit_match")
    out = digit_match(["", "", "", "", ""], ["53", "56", " -45 ", "153", ""], answer=["53"] * 2 + ["-55", "53", "7"])  # fmt: skip
    # 2/2 digits; units wrong (1/2); '-','5' right of 3 (2/3); '5','3' right of 3 chars (2/3); 0
    assert out.scores == pytest.approx([1.0, 0.5, 2 / 3, 2 / 3, 0.0])


def test_an_import_path_names_any_reward_callable():
    from posttrain.rewards import build_reward
    from posttrain.rewards.text_match import format_reward

    assert build_reward("posttrain.rewards.text_match:format_reward") is format_reward
    assert build_reward("posttrain.rewards.text_match:format_reward", name="f").name == "f"
    with pytest.raises(ValueError, match="cannot import it"):
        build_reward("posttrain.rewards.text_match:nothing_here")
