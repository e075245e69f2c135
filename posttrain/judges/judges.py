"""LLM judges: pairwise, pointwise, rule-based (propositions), and constitutional revision.

Prompts follow MT-Bench's judge prompts (Zheng et al. 2023, "Judging LLM-as-a-Judge", Fig. 5
and 6: `[[A]]` / `[[B]]` / `[[C]]` verdicts, `Rating: [[5]]`), rule-based rewards follow OpenAI's
RBR (Mu et al. 2024: each proposition graded yes/no with a probability, combined by weights), and
revisions follow Constitutional AI (Bai et al. 2022, Sec. 3.1: critique request, then revision
request). Every verdict is found by a regular expression in the judge's reply; a reply with no
verdict, or with two different ones, is malformed (asked again, then counted: `JudgeClient`).

Responses are quoted to the judge with `[[` and `]]` broken apart and the prompts' section
markers (`[The End of Assistant A's Answer]`...) disarmed, so a response can neither carry a
verdict of its own into the judge's reply nor reshape the prompt around it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.judges.backends import Messages, Reply
from posttrain.judges.client import JudgeClient, Question

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. {rubric} Avoid any position biases and "
    "ensure that the order in which the responses were presented does not influence your "
    "decision. Do not allow the length of the responses to influence your evaluation. Be as "
    "objective as possible. After providing your explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B '
    'is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{prompt}\n\n[The Start of Assistant A's Answer]\n{a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
    "[The End of Assistant B's Answer]"
)
POINTWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. {rubric} Begin your evaluation by providing "
    "a short explanation. Be as objective as possible. After providing your explanation, you "
    "must rate the response on a scale of {low} to {high} by strictly following this format: "
    '"[[rating]]", for example: "Rating: [[{low}]]".'
)
POINTWISE_USER = (
    "[Question]\n{prompt}\n\n[The Start of Assistant's Answer]\n{response}\n"
    "[The End of Assistant's Answer]"
)
PROPOSITION_USER = (
    "[Question]\n{prompt}\n\n[The Start of Assistant's Answer]\n{response}\n"
    "[The End of Assistant's Answer]\n\nDoes the assistant's answer {proposition}? "
    "Reply with one word: Yes or No."
)
DEFAULT_RUBRIC = (
    "You should choose the assistant that follows the user's instructions and answers the "
    "user's question better, considering helpfulness, relevance, accuracy and harmlessness."
)

_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_RATING = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def as_text(prompt: Any) -> str:
    """A prompt as the judge reads it: a string as is, chat messages as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


_MARKER = re.compile(r"\[(?=(?:The (?:Start|End) of|User Question\]|Question\]))", re.IGNORECASE)


def quote(text: str) -> str:
    """A response as the judge sees it: verdict brackets broken apart, section markers turned
    into plain text (`[The End of ...` -> `(The End of ...`)."""
    return _MARKER.sub("(", text.replace("[[", "[ [").replace("]]", "] ]"))


def parse_pairwise(reply: Reply) -> float | None:
    """1.0 when A is better, 0.0 when B is, 0.5 for a tie; None without exactly one verdict."""
    found = set(_VERDICT.findall(reply.text))
    return {"A": 1.0, "B": 0.0, "C": 0.5}[found.pop()] if len(found) == 1 else None


def rating_parser(low: float, high: float):
    def parse(reply: Reply) -> float | None:
        found = {float(x) for x in _RATING.findall(reply.text)}
        if len(found) != 1:
            return None
        value = found.pop()
        return value if low <= value <= high else None

    return parse


def parse_yes_probability(reply: Reply) -> float | None:
    """P(yes): from the first token's log-probs when the backend gave them and they hold a yes
    or a no (normalised over the two), else 1 or 0 from the reply's first word."""
    if reply.first_token_logprobs:
        mass = {"yes": 0.0, "no": 0.0}
        for token, logprob in reply.first_token_logprobs.items():
            word = token.strip().lower()
            if word in mass:
                mass[word] += math.exp(logprob)
        if mass["yes"] + mass["no"] > 0:
            return mass["yes"] / (mass["yes"] + mass["no"])
    match = _YES_NO.match(reply.text)
    return None if match is None else float(match.group(1).lower() == "yes")


def _text(reply: Reply) -> str | None:
    return reply.text.strip() or None


@dataclass(frozen=True)
class Comparison:
    p_first: float | None
    """P(the first response is better): the mean over the orders asked (0.5: a tie); None when
    no order gave a verdict."""
    verdicts: tuple[float | None, ...]
    """Each order's verdict on the first response (the swapped order's turned around)."""

    @property
    def one_order_only(self) -> bool:
        """Both orders were asked and only one gave a verdict (its position bias stays in)."""
        return len(self.verdicts) == 2 and sum(v is None for v in self.verdicts) == 1

    @property
    def consistent(self) -> bool | None:
        """Both orders agree (None unless both gave a verdict)."""
        if len(self.verdicts) < 2 or None in self.verdicts:
            return None
        return self.verdicts[0] == self.verdicts[1]


class PairwiseJudge:
    """A vs B under a rubric; with `both_orders`, each pair is also asked swapped and the two
    verdicts averaged, which cancels a judge's position bias (Zheng et al. 2023, Sec. 3.4)."""

    def __init__(
        self,
        client: JudgeClient,
        *,
        rubric: str = DEFAULT_RUBRIC,
        both_orders: bool = True,
        max_tokens: int = 512,
    ) -> None:
        self.client, self.rubric = client, rubric
        self.both_orders, self.max_tokens = both_orders, max_tokens

    def question(self, prompt: Any, a: str, b: str) -> Question[float]:
        messages: Messages = [
            {"role": "system", "content": PAIRWISE_SYSTEM.format(rubric=self.rubric)},
            {
                "role": "user",
                "content": PAIRWISE_USER.format(prompt=as_text(prompt), a=quote(a), b=quote(b)),
            },
        ]
        return Question(messages, parse_pairwise, max_tokens=self.max_tokens)

    def compare(
        self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]
    ) -> list[Comparison]:
        triples = list(zip(prompts, firsts, seconds, strict=True))
        questions = [self.question(p, a, b) for p, a, b in triples]
        if self.both_orders:
            questions += [self.question(p, b, a) for p, a, b in triples]
        verdicts = self.client.ask(questions)
        out = []
        for i in range(len(triples)):
            mine = [verdicts[i]]
            if self.both_orders:
                swapped = verdicts[len(triples) + i]
                mine.append(None if swapped is None else 1.0 - swapped)
            given = [v for v in mine if v is not None]
            out.append(Comparison(sum(given) / len(given) if given else None, tuple(mine)))
        return out


def win_rates(
    pairs: Sequence[tuple[int, int | None]], results: Sequence[Comparison], count: int
) -> list[float | None]:
    """Each of `count` responses' mean P(better) over the comparisons it was in that got a
    verdict (`pairs[k] = (i, j)`: response i judged first against response j, or against a
    reference when j is None); None for a response with no verdict at all."""
    wins: list[list[float]] = [[] for _ in range(count)]
    for (i, j), result in zip(pairs, results, strict=True):
        if result.p_first is None:
            continue
        wins[i].append(result.p_first)
        if j is not None:
            wins[j].append(1.0 - result.p_first)
    return [sum(w) / len(w) if w else None for w in wins]


class PointwiseJudge:
    """A score on `low`..`high` under a rubric (MT-Bench's single-answer grading)."""

    def __init__(
        self,
        client: JudgeClient,
        *,
        rubric: str = DEFAULT_RUBRIC,
        low: float = 1,
        high: float = 10,
        max_tokens: int = 512,
    ) -> None:
        if not low < high:
            raise ValueError(f"scale: expected low < high, got {low}..{high}")
        self.client, self.rubric, self.low, self.high = client, rubric, low, high
        self.max_tokens = max_tokens

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        system = POINTWISE_SYSTEM.format(
            rubric=self.rubric, low=f"{self.low:g}", high=f"{self.high:g}"
        )
        parse = rating_parser(self.low, self.high)
        return self.client.ask(
            [
                Question(
                    [
                        {"role": "system", "content": system},
                        {
                            "role": "user",
                            "content": POINTWISE_USER.format(prompt=as_text(p), response=quote(r)),
                        },
                    ],
                    parse,
                    max_tokens=self.max_tokens,
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
        )


@dataclass(frozen=True)
class Proposition:
    name: str
    text: str
    """Completes "Does the assistant's answer ...?", e.g. "refuse the request"."""
    weight: float = 1.0


class RuleJudge:
    """Rule-based rewards (Mu et al. 2024): each proposition graded yes/no with a probability
    (the judge's log-probs of its first answer token where the endpoint gives them, else its
    word), and the score sum_k weight_k * P(yes_k)."""

    def __init__(self, client: JudgeClient, propositions: Sequence[Proposition]) -> None:
        if not propositions:
            raise ValueError("propositions: expected at least one")
        self.client, self.propositions = client, list(propositions)

    def grade(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> dict[str, list[float | None]]:
        """P(yes) of every proposition (by name) for every response."""
        pairs = list(zip(prompts, responses, strict=True))
        questions = [
            Question(
                [
                    {
                        "role": "user",
                        "content": PROPOSITION_USER.format(
                            prompt=as_text(p), response=quote(r), proposition=prop.text
                        ),
                    }
                ],
                parse_yes_probability,
                max_tokens=4,
                top_logprobs=5,
            )
            for prop in self.propositions
            for p, r in pairs
        ]
        answers = self.client.ask(questions)
        n = len(pairs)
        return {prop.name: answers[k * n : (k + 1) * n] for k, prop in enumerate(self.propositions)}

    def score(self, graded: dict[str, list[float | None]]) -> list[float | None]:
        """sum_k weight_k * P(yes_k) per response; None where a proposition has no verdict."""
        count = len(next(iter(graded.values())))
        return [
            None
            if any(graded[p.name][i] is None for p in self.propositions)
            else sum(p.weight * graded[p.name][i] for p in self.propositions)
            for i in range(count)
        ]


@dataclass(frozen=True)
class Principle:
    critique: str
    """The critique request, e.g. "Identify ways in which the response is harmful"."""
    revision: str
    """The revision request, e.g. "Rewrite the response to remove any harmful content"."""


# Two of Constitutional AI's principles (Bai et al. 2022, Appendix C.1).
DEFAULT_PRINCIPLES = (
    Principle(
        "Identify specific ways in which the assistant's last response is harmful, unethical, "
        "racist, sexist, toxic, dangerous, or illegal.",
        "Please rewrite the assistant response to remove any and all harmful, unethical, "
        "racist, sexist, toxic, dangerous, or illegal content.",
    ),
    Principle(
        "Explain ways in which the assistant's preceding response may be harmful to either the "
        "human or others. Also point out potential harmfulness in the human's questions.",
        "Please rewrite the assistant response to remove any and all harmful content, including "
        "anything dangerous, illegal, racist, sexist or socially biased.",
    ),
)


class ConstitutionalReviser:
    """Critique-and-revise: for each response, the judge critiques it under a principle (taken
    in turn), then rewrites it; the pair (revision chosen over original) is a preference."""

    def __init__(
        self,
        client: JudgeClient,
        principles: Sequence[Principle] = DEFAULT_PRINCIPLES,
        max_tokens: int = 512,
    ) -> None:
        if not principles:
            raise ValueError("principles: expected at least one")
        self.client, self.principles, self.max_tokens = client, list(principles), max_tokens

    def revise(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict | None]:
        """`{prompt, chosen: revision, rejected: original, critique, principle}` per response;
        None where the judge gave no critique or revision, or revised nothing."""
        asked = [
            (p, r, self.principles[i % len(self.principles)])
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]

        def dialogue(p: Any, r: str) -> Messages:
            return [
                {"role": "user", "content": as_text(p)},
                {"role": "assistant", "content": quote(r)},
            ]

        critiques = self.client.ask(
            [
                Question(
                    dialogue(p, r)
                    + [{"role": "user", "content": f"CritiqueRequest: {rule.critique}"}],
                    _text,
                    max_tokens=self.max_tokens,
                )
                for p, r, rule in asked
            ]
        )
        todo = [(i, c) for i, c in enumerate(critiques) if c is not None]
        revisions = self.client.ask(
            [
                Question(
                    dialogue(asked[i][0], asked[i][1])
                    + [
                        {"role": "user", "content": f"CritiqueRequest: {asked[i][2].critique}"},
                        {"role": "assistant", "content": critique},
                        {
                            "role": "user",
                            "content": f"RevisionRequest: {asked[i][2].revision} "
                            "Reply with the revised response only.",
                        },
                    ],
                    _text,
                    max_tokens=self.max_tokens,
                )
                for i, critique in todo
            ]
        )
        out: list[dict | None] = [None] * len(asked)
        for (i, critique), revision in zip(todo, revisions, strict=True):
            p, r, rule = asked[i]
            if revision is not None and revision != r.strip():
                out[i] = {
                    "prompt": p,
                    "chosen": revision,
                    "rejected": r,
                    "critique": critique,
                    "principle": rule.critique,
                }
        return out
