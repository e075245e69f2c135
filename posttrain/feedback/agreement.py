"""How much annotators agree: Krippendorff's alpha and pairwise agreement.

Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability",
section C, "ordinal data") is 1 - D_o / D_e, the disagreement observed between annotators of
the same unit over the disagreement expected if values were paired at random. From the
coincidence matrix o[c][k] = sum over units u of (pairs of values c, k in u) / (m_u - 1), where
m_u counts the values in u (units with one value are left out), n_c = sum_k o[c][k] and n is
the sum of n_c:

    alpha = 1 - (n - 1) * sum_ck o[c][k] d2(c, k) / sum_ck n_c n_k d2(c, k)

with d2 the squared metric: nominal 0 or 1; interval (c - k)^2; ordinal
(sum of n_g for g from c to k - (n_c + n_k) / 2)^2. 1 is perfect agreement, 0 is chance,
below 0 systematic disagreement; None when it is undefined (no unit with two values, or one
value everywhere).

What the units are:
- a rank project: one unit per (item, response), the value its position in an annotator's
  ranking (0 = best), ordinal. Positions within one ranking are not independent (they are a
  permutation), which alpha does not model; it is still the usual way to score rank agreement.
- a pair project: one unit per item, the value 0 (first response better), 1 (tie) or 2
  (second better), ordinal, so a tie is half-way between the two verdicts.

Pairwise agreement is easier to read: over every two annotators of the same item and every two
of its responses, the fraction whose order (or tie) they agree on; chance is 1/2 for rankings.
Per annotator: their pairwise agreement with the others on shared items, and alpha without
their labels (alpha going up when someone is left out says they disagree with the rest).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

Level = Literal["nominal", "ordinal", "interval"]


@dataclass(frozen=True)
class Judgment:
    """One label, as agreement needs it."""

    item: Hashable
    annotator: str
    ranking: tuple[int, ...] | None
    """Response indices best first; None for a tie."""
    k: int
    """Responses of the item."""


def krippendorff_alpha(units: Sequence[Sequence[float]], level: Level = "ordinal") -> float | None:
    """Alpha of `units`, each the values its annotators gave it (missing ones left out)."""
    units = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    index = {v: i for i, v in enumerate(values)}
    size = len(values)
    o = [[0.0] * size for _ in range(size)]
    for unit in units:
        m = len(unit)
        for a in range(m):
            for b in range(m):
                if a != b:
                    o[index[unit[a]]][index[unit[b]]] += 1.0 / (m - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)

    def d2(c: int, k: int) -> float:
        if level == "nominal":
            return float(c != k)
        if level == "interval":
            return float(values[c] - values[k]) ** 2
        lo, hi = min(c, k), max(c, k)
        return (sum(n_c[lo : hi + 1]) - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c][k] * d2(c, k) for c in range(size) for k in range(size))
    expected = sum(n_c[c] * n_c[k] * d2(c, k) for c in range(size) for k in range(size))
    if n < 2 or expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def units_of(judgments: Sequence[Judgment], mode: str) -> list[list[float]]:
    """Alpha's units (see the module docstring) of a project's judgments."""
    units: dict[Hashable, list[float]] = defaultdict(list)
    for j in judgments:
        if mode == "pair":
            units[j.item].append(1.0 if j.ranking is None else 2.0 * j.ranking[0])
        else:
            assert j.ranking is not None, "a rank project has no ties"
            for position, response in enumerate(j.ranking):
                units[(j.item, response)].append(float(position))
    return list(units.values())


def _preferences(j: Judgment) -> dict[tuple[int, int], int]:
    """For each two responses i < j: +1 if i is better, -1 if worse, 0 for a tie."""
    if j.ranking is None:
        return {(a, b): 0 for a, b in combinations(range(j.k), 2)}
    position = {r: p for p, r in enumerate(j.ranking)}
    return {(a, b): 1 if position[a] < position[b] else -1 for a, b in combinations(range(j.k), 2)}


def pairwise_counts(judgments: Sequence[Judgment]) -> dict[tuple[str, str], tuple[int, int]]:
    """For each two annotators (sorted names): (response pairs they agree on, pairs both
    judged), over the items both labelled."""
    by_item: dict[Hashable, list[Judgment]] = defaultdict(list)
    for j in judgments:
        by_item[j.item].append(j)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for group in by_item.values():
        prefs = [(j.annotator, _preferences(j)) for j in group]
        for (x, px), (y, py) in combinations(sorted(prefs, key=lambda p: p[0]), 2):
            both = counts[(x, y)]
            both[0] += sum(px[pair] == py[pair] for pair in px)
            both[1] += len(px)
    return {pair: (agree, total) for pair, (agree, total) in counts.items()}


def agreement_report(judgments: Sequence[Judgment], mode: str) -> dict[str, Any]:
    """Alpha and pairwise agreement of a project, and each annotator's share in them."""
    counts = pairwise_counts(judgments)
    agree, total = sum(a for a, _ in counts.values()), sum(t for _, t in counts.values())
    items: dict[Hashable, int] = defaultdict(int)
    for j in judgments:
        items[j.item] += 1
    annotators = sorted({j.annotator for j in judgments})
    per_annotator = {}
    for name in annotators:
        theirs = [(a, t) for pair, (a, t) in counts.items() if name in pair]
        their_total = sum(t for _, t in theirs)
        mine = [j for j in judgments if j.annotator == name]
        per_annotator[name] = {
            "labels": len(mine),
            "shared_items": sum(items[j.item] >= 2 for j in mine),
            "pairwise_agreement": (
                sum(a for a, _ in theirs) / their_total if their_total else None
            ),
            "alpha_without": krippendorff_alpha(
                units_of([j for j in judgments if j.annotator != name], mode)
            ),
        }
    return {
        "labels": len(judgments),
        "items_labelled": len(items),
        "items_with_2_or_more_labels": sum(n >= 2 for n in items.values()),
        "alpha": krippendorff_alpha(units_of(judgments, mode)),
        "pairwise_agreement": agree / total if total else None,
        "annotators": per_annotator,
    }
