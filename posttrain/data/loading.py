"""Read rows from files and turn them into validated records.

Formats: JSONL (one object per line), JSON (an array of objects), Parquet, and directories that
`datasets` wrote with `save_to_disk` (a Dataset, or a DatasetDict and a split). Row numbers are
1-based: the line number for JSONL (blank lines are skipped but still counted, so the number is
the one your editor shows), the row index + 1 for everything else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.data.records import REQUIRED_FIELDS, DataError, Record, parse_record, record_type

Rows = Iterator[tuple[int, dict[str, Any]]]

FORMATS = (".jsonl", ".json", ".parquet")

# The column that tells each kind apart; a row with only `prompt` is a prompt row.
_KIND_MARKERS = {
    "chosen": "preference",
    "rejected": "preference",
    "responses": "ranking",
    "label": "labeled",
    "completion": "completion",
    "messages": "conversation",
}


def read_rows(path: str | Path, *, split: str = "train") -> Rows:
    """Yield (row number, row) from a file or a `save_to_disk` directory.

    The path and format are checked now; a row's problems are raised when it is reached, so a
    large file streams. `split` picks the split of a DatasetDict and is ignored otherwise.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        return _dataset_rows(path, source, split)
    if not path.exists():
        raise DataError(source, None, None, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, source)
    if suffix == ".json":
        return _json_rows(path, source)
    if suffix == ".parquet":
        return _parquet_rows(path, source)
    problem = f"unknown format {suffix or '(no extension)'!r}; expected {', '.join(FORMATS)}"
    raise DataError(
        source, None, None, f"{problem} or a directory written by datasets' save_to_disk"
    )


def load_records(
    path: str | Path,
    kind: str,
    *,
    limit: int | None = None,
    split: str = "train",
    max_chars: int | None = None,
) -> list[Record]:
    """Read and validate every row (the first `limit` rows, if given) as a `kind` record.

    Integer ids become strings, so `7` and `"7"` are the same id, and a repeated id is an error.

    `max_chars` bounds each text of a row in characters (a prompt, a completion, each response;
    a list of messages counts their contents together): a longer one is a DataError naming the
    file, row and field, raised as the row is read, before anything tokenizes it. To refuse
    texts that cannot fit in N tokens, pass
    `max_chars=N * posttrain.data.tokenize.longest_token_chars(tokenizer)`: with a tokenizer that
    drops no text (byte-level BPE, as Qwen, Llama 3 and GPT-2 have), no longer text is N tokens or
    fewer, so this refuses only rows that would fail anyway.
    """
    record_type(kind)  # a misspelled kind should fail before a large file is read
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    source = str(path)
    records: list[Record] = []
    row_of_id: dict[str, int] = {}
    for row_number, row in read_rows(path, split=split):
        record = parse_record(row, kind, source=source, row_number=row_number, max_chars=max_chars)
        if record.id is not None:
            if record.id in row_of_id:
                problem = f"duplicate id {record.id!r}, already used in row {row_of_id[record.id]}"
                raise DataError(source, row_number, "id", problem)
            row_of_id[record.id] = row_number
        records.append(record)
        if len(records) == limit:
            break
    if not records:
        raise DataError(source, None, None, "no rows; expected at least one record")
    return records


def detect_kind(
    row: dict[str, Any], *, source: str = "<row>", row_number: int | None = None
) -> str:
    """The record kind a row's columns describe; DataError if none or more than one fits."""
    kinds = {_KIND_MARKERS[name] for name in row if name in _KIND_MARKERS}
    if {"labeled", "completion"} <= kinds:
        kinds.discard("completion")  # a labeled row is a completion plus its label
    if "prompt" in row and (not kinds or kinds == {"conversation"}):
        kinds.add("prompt")  # with `messages` too, it is unclear which one is the input
    if len(kinds) == 1:
        return kinds.pop()
    shapes = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in REQUIRED_FIELDS.items())
    columns = ", ".join(row) or "none"
    problem = f"fit {' and '.join(sorted(kinds))}" if kinds else "match no record kind"
    raise DataError(
        source, row_number, None, f"columns ({columns}) {problem}; accepted shapes are {shapes}"
    )


def _as_row(value: object, source: str, row_number: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        got = "null" if value is None else type(value).__name__
        raise DataError(source, row_number, None, f"expected a JSON object, got {got}")
    return value


def _jsonl_rows(path: Path, source: str) -> Rows:
    offset = 0  # of the current line in the file, so a bad byte can be found with a hex editor
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = (
                    f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset "
                    f"{offset + err.start} of the file (column {err.start + 1} of the line)"
                )
                raise DataError(source, line_number, None, problem) from None
            offset += len(raw)
            if line_number == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark some Windows editors write
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                problem = f"invalid JSON at column {err.colno}: {err.msg}"
                raise DataError(source, line_number, None, problem) from None
            yield line_number, _as_row(value, source, line_number)


def _json_rows(path: Path, source: str) -> Rows:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        problem = f"not valid UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start}"
        raise DataError(source, None, None, f"line {line}: {problem}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        problem = f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        raise DataError(source, None, None, problem) from None
    if not isinstance(value, list):
        got = type(value).__name__
        if isinstance(value, dict):
            got = "an object (for one object per line, use .jsonl)"
        raise DataError(source, None, None, f"expected a JSON array of row objects, got {got}")
    for index, row in enumerate(value):
        yield index + 1, _as_row(row, source, index + 1)


def _parquet_rows(path: Path, source: str) -> Rows:
    # here, not at the top: pyarrow holds ~24 MB of resident memory and only Parquet needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(source, None, None, f"not a readable Parquet file: {err}") from None
    row_number = 0
    for batch in parquet.iter_batches():  # in batches, so a large file is never whole in memory
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _dataset_rows(path: Path, source: str, split: str) -> Rows:
    if not (path / "dataset_dict.json").exists() and not (path / "state.json").exists():
        problem = "a directory, but not one written by datasets' save_to_disk"
        raise DataError(source, None, None, f"{problem} (no dataset_dict.json or state.json)")
    import datasets  # here, not at the top: it takes a second to import and only directories need it

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            problem = f"no split {split!r}; it has {', '.join(dataset)} (pass split=...)"
            raise DataError(source, None, None, problem)
        dataset = dataset[split]
    return ((index + 1, row) for index, row in enumerate(dataset))
