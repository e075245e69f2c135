"""Math answer checking with Hugging Face's `math-verify` (parses LaTeX and plain expressions
into sympy and compares them: `\\frac{1}{2}` equals `0.5`, `1,234` equals `1234`).

math-verify limits its own time with `signal.alarm`, which raises outside the main thread
(recipes score in worker threads). So the check runs in a `DeadlinePool` of spawned processes
with math-verify's timeouts off (`parsing_timeout=None, timeout_seconds=None`), and the parent
enforces `timeout_s` per completion: a completion whose check hangs (e.g. `9^{9^{9^{9}}}`, which
sympy tries to evaluate) scores 0 and its worker is replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.extraction import Extract, extract_answer
from posttrain.sandbox.deadline_pool import TIMED_OUT, DeadlinePool

log = logging.getLogger(__name__)


def _import_math_verify() -> None:
    # Silence math-verify's "timeout is disabled" warning: the parent keeps the clock.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401


def verify_answer(gold: str, answer: str) -> bool:
    """math-verify's verdict on `answer` (the extracted text, e.g. `\\frac{1}{2}`) against
    `gold` (e.g. `0.5` or `$\\frac12$`). No time limit: call it through a `DeadlinePool`."""
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=None) or parse(f"${gold}$", parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{answer.strip().strip('$')}}}", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


class MathReward:
    """1.0 when the completion's final answer equals the gold `answer` field under math-verify,
    else 0.0 (also when there is no answer, or the check ran past `timeout_s`).

    Components: `correct`, `has_answer` (an answer was extracted), `timed_out`.
    """

    def __init__(
        self,
        *,
        extract: Extract = "boxed",
        answer_pattern: str | None = None,
        timeout_s: float = 5.0,
        workers: int = 1,
        start_timeout_s: float = 120.0,
        name: str = "math",
    ) -> None:
        self.name, self.extract, self.answer_pattern = name, extract, answer_pattern
        self.pool = DeadlinePool(
            verify_answer,
            workers=workers,
            timeout_s=timeout_s,
            start_timeout_s=start_timeout_s,
            initializer=_import_math_verify,
        )

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        if "answer" not in fields:
            raise ValueError(f"reward {self.name!r}: needs the field 'answer' (the gold answer)")
        answers = [extract_answer(c, self.extract, self.answer_pattern) for c in completions]
        to_check = [i for i, a in enumerate(answers) if a is not None]
        verdicts = self.pool.run([(str(fields["answer"][i]), answers[i]) for i in to_check])
        correct = [0.0] * len(completions)
        timed_out = [0.0] * len(completions)
        for i, verdict in zip(to_check, verdicts, strict=True):
            if verdict is TIMED_OUT:
                timed_out[i] = 1.0
                log.warning(
                    "reward %r: completion %d: math-verify ran past %.1fs on answer %.80r; scored 0",
                    self.name,
                    i,
                    self.pool.timeout_s,
                    answers[i],
                )
            else:
                correct[i] = float(verdict)
        return RewardOutput(
            correct,
            components={
                "correct": correct,
                "has_answer": [float(a is not None) for a in answers],
                "timed_out": timed_out,
            },
            metrics={f"reward/{self.name}/timeouts": sum(timed_out)},
        )

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()
