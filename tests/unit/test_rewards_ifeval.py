"""IFEval checkers, offline: every one of the 541 prompts evaluates, and hand-written compliant
and non-compliant responses score as a reader would expect."""

from __future__ import annotations

import pytest

from posttrain.rewards import build_reward, check_output
from posttrain.tasks import TASKS

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("punctuation:no_comma", {}, "Hello world. No commas here.", "Hello, world."),
    (
        "change_case:english_lowercase",
        {},
        "this whole answer is written in lower case letters only, as you asked.",
        "This answer starts with a capital letter, which breaks the rule.",
    ),
    (
        "change_case:english_capital",
        {},
        "THIS WHOLE ANSWER IS WRITTEN IN CAPITAL LETTERS AS YOU ASKED.",
        "THIS ANSWER IS MOSTLY CAPITAL but not all of it.",
    ),
    (
        "length_constraints:number_sentences",
        {"relation": "less than", "num_sentences": 3},
        "Mr. Smith went home. He slept.",  # two sentences: the splitter keeps "Mr." whole
        "One. Two. Three. Four.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_relation": "at least", "capital_frequency": 3},
        "The BIG RED DOG ran home.",
        "The big red dog ran home.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_relation": "less than", "capital_frequency": 2},
        "Only ONE shouted word here.",
        "TWO SHOUTED words here.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* first point\n* second point",
        "* only one point",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Here is my answer. Any other questions?",
        "Any other questions? Here is my answer.",
    ),
    ("detectable_format:title", {}, "<<A Good Title>>\nThe body.", "A Good Title\nThe body."),
    (
        "keywords:existence",
        {"keywords": ["banana", "apple"]},
        "An apple and a banana.",
        "Only an apple.",
    ),
    (
        "length_constraints:number_words",
        {"relation": "at least", "num_words": 5},
        "one two three four five",
        "one two three",
    ),
    ("startend:quotation", {}, '"Wrapped in quotes."', "Not wrapped."),
    ("detectable_format:json_format", {}, '{"answer": 42}', "answer: 42"),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
        "A lazy zebra.",
        "A lazy horse.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Main text.\n\nP.S. A note.",
        "Main text only.",
    ),
]


@pytest.fixture(scope="module")
def ifeval():
    return build_reward("ifeval")


@pytest.mark.parametrize(("instruction", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_compliant_scores_one_and_non_compliant_zero(ifeval, instruction, kwargs, good, bad):
    out = ifeval(
        ["prompt", "prompt"],
        [good, bad],
        instruction_id_list=[[instruction]] * 2,
        kwargs=[[kwargs]] * 2,
    )
    check_output(out, 2, "ifeval")
    assert out.components["instruction_strict"] == [1.0, 0.0]
    assert out.components["prompt_strict"] == [1.0, 0.0]


def test_score_is_the_fraction_of_instructions_followed(ifeval):
    ids = ["punctuation:no_comma", "keywords:existence", "startend:quotation"]
    kwargs = [{}, {"keywords": ["banana"]}, {}]
    # follows the first two of three: strict instruction-level 2/3, prompt-level 0
    out = ifeval(["p"], ["A banana. No commas."], instruction_id_list=[ids], kwargs=[kwargs])
    assert out.scores == [pytest.approx(2 / 3)]
    assert out.components["prompt_strict"] == [0.0]


def test_unknown_instruction_id_is_an_error_not_a_skipped_instruction(ifeval):
    with pytest.raises(ValueError, match="punctuation:no_commas"):
        ifeval(["p"], ["text"], instruction_id_list=[["punctuation:no_commas"]], kwargs=[[{}]])


def test_all_541_prompts_evaluate_offline(ifeval):
    rows = TASKS["ifeval"].make("all", None, 0)
    assert len(rows) == 541
    response = (
        "Here is my answer. It has a FEW capital WORDS and several sentences.\n\n"
        "* a bullet point\n* another one\n\nP.S. That is all, thank you."
    )
    out = ifeval(
        [r["prompt"] for r in rows],
        [response] * len(rows),
        instruction_id_list=[r["instruction_id_list"] for r in rows],
        kwargs=[r["kwargs"] for r in rows],
    )
    check_output(out, 541, "ifeval")
    followed = sum(out.components["prompt_strict"])
    assert 0 < followed < 541  # a generic answer follows some prompts' instructions, not all
    assert all(0.0 <= s <= 1.0 for s in out.scores)
