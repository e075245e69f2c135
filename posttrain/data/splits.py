"""Train and held-out record sets, from two files or one file split deterministically."""

from __future__ import annotations

import random
from collections.abc import Sequence

from posttrain.data.loading import detect_kind, load_records, read_rows
from posttrain.data.records import DataError, Record


def file_kind(path: str, accepted: Sequence[str]) -> str:
    """The record kind of a file, judged from its first row and checked against `accepted`."""
    for number, row in read_rows(path):
        kind = detect_kind(row, source=path, row_number=number)
        if kind not in accepted:
            raise DataError(
                path, number, None,
                f"rows look like '{kind}' records; this recipe takes {' or '.join(accepted)}",
            )  # fmt: skip
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
