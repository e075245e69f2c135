"""Loading records from every supported format, kind detection, extra fields and `limit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.loading import detect_kind, load_records, read_rows
from posttrain.data.records import (
    CompletionRecord,
    ConversationRecord,
    LabeledRecord,
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
)

# Every row has the same columns and column types, as Arrow (Parquet, datasets) needs; `source`
# and `meta` are extra columns that must pass through.
PREFERENCE_ROWS: list[dict[str, Any]] = [
    {
        "id": "a",
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": "4",
        "rejected": "5",
        "margin": 1.5,
        "source": "arith",
        "meta": {"difficulty": 1, "tags": ["math"]},
    },
    {
        "id": "b",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": "Paris.",
        "rejected": "Lyon, I think.",
        "margin": None,
        "source": "geo",
        "meta": {"difficulty": 2, "tags": []},
    },
]
PREFERENCE_RECORDS = [
    PreferenceRecord(
        prompt=[{"role": "user", "content": "What is 2 + 2?"}],
        chosen="4",
        rejected="5",
        margin=1.5,
        id="a",
        fields={"source": "arith", "meta": {"difficulty": 1, "tags": ["math"]}},
    ),
    PreferenceRecord(
        prompt=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        chosen="Paris.",
        rejected="Lyon, I think.",
        margin=None,
        id="b",
        fields={"source": "geo", "meta": {"difficulty": 2, "tags": []}},
    ),
]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` in the format `path` names: .jsonl, .json, .parquet, or a save_to_disk dir."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.json", "prefs.parquet", "prefs_dataset"])
def test_every_format_round_trips(tmp_path: Path, name: str) -> None:
    path = write_rows(tmp_path / name, PREFERENCE_ROWS)
    assert load_records(path, "preference") == PREFERENCE_RECORDS


def test_dataset_dict_reads_train_split_or_the_one_asked_for(tmp_path: Path) -> None:
    train, test = PREFERENCE_ROWS[:1], PREFERENCE_ROWS[1:]
    splits = {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", "preference") == PREFERENCE_RECORDS[:1]
    assert load_records(tmp_path / "dd", "preference", split="test") == PREFERENCE_RECORDS[1:]


def test_nested_conversations_round_trip_through_parquet(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    path = write_rows(tmp_path / "chats.parquet", [{"messages": messages, "id": 7}])
    assert load_records(path, "conversation") == [ConversationRecord(messages, id="7")]


# One row of every kind, and the record it must become (ids, margins and labels included).
KIND_CASES = [
    ("prompt", {"prompt": "Name a prime.", "answer": "7"}, PromptRecord("Name a prime.", fields={"answer": "7"})),
    ("completion", {"prompt": "Hi", "completion": "Hello", "id": 3}, CompletionRecord("Hi", "Hello", id="3")),
    (
        "conversation",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        ConversationRecord([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
    ),
    ("preference", {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away", "margin": 2}, PreferenceRecord("Hi", "Hello", "Go away", margin=2.0)),
    ("ranking", {"prompt": "Hi", "responses": ["Hello", "Hey", "Meh"]}, RankingRecord("Hi", ["Hello", "Hey", "Meh"])),
    ("labeled", {"prompt": "Hi", "completion": "Go away", "label": False}, LabeledRecord("Hi", "Go away", False)),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "row", "record"), KIND_CASES, ids=[c[0] for c in KIND_CASES])
def test_each_kind_loads_from_jsonl(tmp_path: Path, kind: str, row: dict, record: object) -> None:
    path = write_rows(tmp_path / "data.jsonl", [row])
    assert load_records(path, kind) == [record]


@pytest.mark.parametrize(("kind", "row", "record"), KIND_CASES, ids=[c[0] for c in KIND_CASES])
def test_detect_kind_from_columns(kind: str, row: dict, record: object) -> None:
    assert detect_kind(row) == kind


def test_extra_fields_pass_through_untouched(tmp_path: Path) -> None:
    row = {"prompt": "2+2?", "answer": "4", "tests": [{"input": "x", "output": None}], "w": 0.5}
    [record] = load_records(write_rows(tmp_path / "p.jsonl", [row]), "prompt")
    assert record.fields == {"answer": "4", "tests": [{"input": "x", "output": None}], "w": 0.5}


def test_columns_of_other_kinds_become_fields(tmp_path: Path) -> None:
    # Prompts for online RL are often drawn from a preference set: chosen/rejected ride along.
    [record] = load_records(write_rows(tmp_path / "p.jsonl", PREFERENCE_ROWS[:1]), "prompt")
    assert record == PromptRecord(
        [{"role": "user", "content": "What is 2 + 2?"}],
        id="a",
        fields={
            "chosen": "4",
            "rejected": "5",
            "margin": 1.5,
            "source": "arith",
            "meta": {"difficulty": 1, "tags": ["math"]},
        },
    )


def test_limit_stops_before_later_rows_are_read(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": ""}\nnot json\n')
    assert load_records(path, "prompt", limit=2) == [PromptRecord("a"), PromptRecord("b")]


def test_limit_larger_than_the_file_returns_every_row(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert len(load_records(path, "prompt", limit=10)) == 2


def test_limit_must_be_positive(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="limit must be a positive integer or None, got 0"):
        load_records(path, "prompt", limit=0)


def test_jsonl_row_numbers_are_line_numbers_with_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n   \n{"prompt": "b"}\r\n\n')
    assert list(read_rows(path)) == [(1, {"prompt": "a"}), (4, {"prompt": "b"})]


def test_read_rows_numbers_parquet_rows_across_batches(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    rows = [{"prompt": f"p{i}"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    read = list(read_rows(path))
    assert [n for n, _ in read] == list(range(1, 2501))
    assert read[-1] == (2500, {"prompt": "p2499"})


def test_string_and_integer_ids_both_load_as_strings(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": "x"}])
    assert [r.id for r in load_records(path, "prompt")] == ["1", "x"]


def test_integer_margin_loads_as_a_float(tmp_path: Path) -> None:
    row = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away", "margin": 2}
    [record] = load_records(write_rows(tmp_path / "p.jsonl", [row]), "preference")
    assert isinstance(record.margin, float) and record.margin == 2.0
