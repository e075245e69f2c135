"""Instruction following, scored with the IFEval checkers (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models", arXiv:2311.07911) as packaged by `if-verifiable`.

Offline by construction: two checkers need NLTK's trained punkt sentence model, which cannot be
downloaded here, so they are replaced by subclasses that need no data:

- `length_constraints:number_sentences` counts sentences with IFEval's own regex splitter
  (`instructions_util.split_into_sentences`, shipped in the same module) instead of punkt.
- `change_case:capital_word_frequency` tokenizes with `nltk.word_tokenize(text,
  preserve_line=True)`, the same Treebank word tokenizer without punkt's sentence split first.

docs/rewards.md says where the counts can differ from the official ones. Only the IFEval
registry is imported: importing if-verifiable's IFBench registry calls `nltk.download`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from posttrain.rewards.base import RewardOutput


@functools.cache
def instruction_registry() -> dict[str, type]:
    """IFEval instruction id -> checker class, with the two punkt-based checkers replaced."""
    import langdetect
    import nltk
    from if_verifiable.ifeval import instructions, instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    # langdetect is random unless seeded; the seed makes `language:response_language` and the
    # English-case checkers give the same verdict on every call.
    langdetect.DetectorFactory.seed = 0

    class NumberOfSentencesRegex(instructions.NumberOfSentences):
        def check_following(self, value: str) -> bool:
            count = len(instructions_util.split_into_sentences(value))
            if self._comparison_relation == "less than":
                return count < self._num_sentences_threshold
            return count >= self._num_sentences_threshold

    class CapitalWordFrequencyNoPunkt(instructions.CapitalWordFrequencyChecker):
        def check_following(self, value: str) -> bool:
            words = nltk.word_tokenize(value, preserve_line=True)
            capital_words = sum(word.isupper() for word in words)
            if self._comparison_relation == "less than":
                return capital_words < self._frequency
            return capital_words >= self._frequency

    registry = dict(INSTRUCTION_DICT)
    registry["length_constraints:number_sentences"] = NumberOfSentencesRegex
    registry["change_case:capital_word_frequency"] = CapitalWordFrequencyNoPunkt
    return registry


class IFEvalReward:
    """Fraction of a prompt's instructions the completion follows, strictly (IFEval's
    "instruction-level strict accuracy" for one prompt).

    Fields: `instruction_id_list` (e.g. `["punctuation:no_comma"]`) and `kwargs` (one dict of
    checker arguments per instruction). Components: `instruction_strict` (the score),
    `prompt_strict` (1.0 when all are followed), and the same two under IFEval's "loose"
    rules (`instruction_loose`, `prompt_loose`: also try the response without its first or
    last line and without `*`). A `<think>...</think>` block is removed first, as if-verifiable
    does. An empty response scores 0.
    """

    def __init__(self, *, name: str = "ifeval") -> None:
        self.name = name
        self.registry = instruction_registry()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        from if_verifiable.common import evaluate_instructions

        for key in ("instruction_id_list", "kwargs"):
            if key not in fields:
                raise ValueError(f"reward {self.name!r}: needs the field {key!r}")
        columns: dict[str, list[float]] = {
            "instruction_strict": [],
            "prompt_strict": [],
            "instruction_loose": [],
            "prompt_loose": [],
        }
        for i, completion in enumerate(completions):
            ids = list(fields["instruction_id_list"][i])
            kwargs = list(fields["kwargs"][i] or [{} for _ in ids])
            unknown = [x for x in ids if x not in self.registry]
            if unknown:
                # if-verifiable skips unknown ids silently, which would inflate the fraction.
                raise ValueError(
                    f"reward {self.name!r}: completion {i}: unknown IFEval instruction id "
                    f"{unknown[0]!r}"
                )
            if len(kwargs) != len(ids):
                raise ValueError(
                    f"reward {self.name!r}: completion {i}: {len(ids)} instruction ids but "
                    f"{len(kwargs)} kwargs entries"
                )
            _, scores = evaluate_instructions(completion, ids, kwargs, prompts[i], self.registry)
            columns["instruction_strict"].append(scores.partial_strict)
            columns["prompt_strict"].append(scores.binary_strict)
            columns["instruction_loose"].append(scores.partial_loose)
            columns["prompt_loose"].append(scores.binary_loose)
        return RewardOutput(list(columns["instruction_strict"]), components=columns)
