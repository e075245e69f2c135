"""Train and held-out record sets, from two files or one file split deterministically."""

from __future__ import annotations

import random
from collections.abc import Sequence

from posttrain.data.loading import detect_kind, load_records, read_rows
from posttrain.data.records import REQUIRED_FIELDS, DataError, Record


def file_kind(path: str, accepted: Sequence[str]) -> str:
    """The record kind of a file, judged from its first row and checked against `accepted`.

    A first row without the fields of any accepted kind is an error naming the fields it lacks
    for the accepted kind it comes closest to."""
    shapes = " or ".join("{" + ", ".join(REQUIRED_FIELDS[k]) + "}" for k in accepted)
    for number, row in read_rows(path):
        missing = {k: [name for name in REQUIRED_FIELDS[k] if name not in row] for k in accepted}
        if all(missing.values()):
            # closest: the most of its fields present, then the fewest missing
            closest = max(
                accepted, key=lambda k: (len(row.keys() & REQUIRED_FIELDS[k]), -len(missing[k]))
            )
            names = missing[closest]
            problem = (
                f"missing field{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}; "
                f"this recipe reads {shapes} rows (this row has {', '.join(row) or 'no fields'})"
            )
            raise DataError(path, number, None, problem)
        kind = detect_kind(row, source=path, row_number=number)
        if kind not in accepted:
            problem = f"rows look like '{kind}' records; this recipe reads {shapes} rows"
            raise DataError(path, number, None, problem)
        return kind
    raise DataError(path, None, None, "the file has no rows")


def load_train_eval(
    train: str,
    eval: str = "",
    *,
    kinds: Sequence[str],
    eval_fraction: float = 0.05,
    seed: int = 0,
    limit: int = 0,
) -> tuple[list[Record], list[Record]]:
    """Records from `train` and `eval`; without `eval`, a seeded `eval_fraction` of `train`."""
    if not train:
        raise DataError("data.train", None, None, "no training file given (set data.train=PATH)")
    records = load_records(train, file_kind(train, kinds), limit=limit or None)
    if eval:
        return records, load_records(eval, file_kind(eval, kinds))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(records) * eval_fraction)
    held = set(order[:n_eval])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )
