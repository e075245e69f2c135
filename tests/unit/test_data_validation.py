"""Bad input: every error names the file, the row and the field, and says what was expected."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.loading import detect_kind, load_records, read_rows
from posttrain.data.records import DataError, parse_record
from posttrain.data.splits import load_train_eval

USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello"}

# (kind, bad row, field the error names, expected problem as a regex). Each bad row goes on line 2
# of a file whose line 1 is valid, so the row number is checked too.
BAD_ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("completion", {"prompt": "Hi"}, "completion", "missing; a completion row needs prompt, completion \\(this row has prompt\\)"),
    ("preference", {"prompt": "Hi", "chosen": 3, "rejected": "No"}, "chosen", "expected a string, got int"),
    ("preference", {"prompt": "Hi", "chosen": None, "rejected": "No"}, "chosen", "expected a string, got null"),
    ("prompt", {"prompt": ""}, "prompt", "empty or whitespace-only text"),
    ("completion", {"prompt": "Hi", "completion": " \n\t"}, "completion", "empty or whitespace-only text"),
    ("prompt", {"prompt": {"text": "Hi"}}, "prompt", "expected a string or a list of messages, got dict"),
    ("preference", {"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "rejected", "identical to 'chosen'"),
    ("ranking", {"prompt": "Hi", "responses": ["Only one"]}, "responses", "1 response\\(s\\); a ranking needs at least 2"),
    ("ranking", {"prompt": "Hi", "responses": "a, b"}, "responses", "expected a list of strings, got str"),
    ("ranking", {"prompt": "Hi", "responses": ["A", "B", "A"]}, "responses[2]", "same text as responses\\[0\\]"),
    ("ranking", {"prompt": "Hi", "responses": ["A", 2]}, "responses[1]", "expected a string, got int"),
    ("labeled", {"prompt": "Hi", "completion": "Yo", "label": "yes"}, "label", "expected true or false, got str 'yes'"),
    ("labeled", {"prompt": "Hi", "completion": "Yo", "label": 1}, "label", "expected true or false, got int 1"),
    ("preference", {"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": "1"}, "margin", "expected a number, got str"),
    ("preference", {"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": True}, "margin", "expected a number, got bool"),
    ("preference", {"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": float("nan")}, "margin", "expected a finite number, got nan"),
    ("preference", {"prompt": "Hi", "chosen": "A", "rejected": "B", "margin": float("-inf")}, "margin", "expected a finite number, got -inf"),
    ("conversation", {"messages": "Hi there"}, "messages", "expected a list of messages, got str"),
    ("conversation", {"messages": []}, "messages", "empty list; expected at least one message"),
    ("conversation", {"messages": ["Hi", BOT]}, "messages[0]", "expected a {role, content} object, got str"),
    ("conversation", {"messages": [{"role": "user"}, BOT]}, "messages[0].content", "missing; a message needs role and content"),
    ("conversation", {"messages": [{"content": "Hi"}, BOT]}, "messages[0].role", "missing; a message needs role and content"),
    ("conversation", {"messages": [{"role": "bot", "content": "Hi"}, BOT]}, "messages[0].role", "unknown role 'bot'; expected one of system, user, assistant, tool"),
    ("conversation", {"messages": [USER, {"role": "assistant", "content": 5}]}, "messages[1].content", "expected a string, got int"),
    ("conversation", {"messages": [USER, {**BOT, "tool_calls": []}]}, "messages[1].tool_calls", "unexpected key; a message has only role and content"),
    ("conversation", {"messages": [USER, USER]}, "messages", "no assistant turn"),
    ("conversation", {"messages": [USER, BOT, USER]}, "messages[2].role", "the last message is from the user; a training conversation must end on an assistant turn"),
    ("prompt", {"prompt": [USER, BOT]}, "prompt[1].role", "the last message of a prompt is from the assistant"),
    ("completion", {"prompt": [], "completion": "Yo"}, "prompt", "empty list; expected at least one message"),
    ("prompt", {"prompt": "Hi", "id": 1.5}, "id", "expected a string or an integer, got float"),
    ("prompt", {"prompt": "Hi", "id": True}, "id", "expected a string or an integer, got bool"),
    ("prompt", {"prompt": "Hi", "id": "  "}, "id", "empty or whitespace-only id"),
    ("completion", {"prompt": "Hi", "completion": "bad \ud800 text"}, "completion", "not valid UTF-8: lone surrogate '\\\\ud800' at character 4"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "row", "field", "problem"),
    BAD_ROWS,
    ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_ROWS)],
)
def test_bad_row_names_file_row_and_field(
    tmp_path: Path, kind: str, row: dict[str, Any], field: str, problem: str
) -> None:
    good = {"prompt": "Fine", "completion": "Yes", "chosen": "Yes", "rejected": "No", "label": True}
    good |= {"responses": ["Yes", "No"], "messages": [USER, BOT]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as caught:
        load_records(path, kind)
    err = caught.value
    assert (err.source, err.row, err.field) == (str(path), 2, field)
    assert re.fullmatch(re.escape(f"{path}: row 2: field '{field}': ") + problem + ".*", str(err))


def test_duplicate_id_names_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    rows = [{"prompt": "a", "id": 7}, {"prompt": "b", "id": 8}, {"prompt": "c", "id": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"dup\.jsonl: row 3: field 'id': duplicate id '7', already used in row 1"
    ):
        load_records(path, "prompt")


def test_non_utf8_jsonl_gives_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as caught:
        load_records(path, "prompt")
    assert caught.value.row == 2
    # Line 1 is 17 bytes; the bad byte is the 16th of line 2 (offset 15).
    assert str(caught.value) == (
        f"{path}: row 2: not valid UTF-8: byte 0xe9 at byte offset 32 of the file "
        "(column 16 of the line)"
    )


def test_non_utf8_json_gives_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    # "[\n" is 2 bytes and 0xe9 is byte 15 of line 2, so it sits at offset 17.
    path.write_bytes(b'[\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(
        DataError, match=r"latin1\.json: line 2: not valid UTF-8: byte 0xe9 at byte offset 17$"
    ):
        load_records(path, "prompt")


def test_bad_json_line_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(
        DataError, match=r"broken\.jsonl: row 2: invalid JSON at column 16: Expecting property name"
    ):
        load_records(path, "prompt")


def test_bad_json_file_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a"}\n  {"prompt": "b"}\n]')
    with pytest.raises(
        DataError, match=r"broken\.json: invalid JSON at line 3 column 3: Expecting ','"
    ):
        load_records(path, "prompt")


@pytest.mark.parametrize(
    ("name", "content", "row", "got"),
    [
        ("rows.jsonl", '{"prompt": "a"}\n["prompt", "b"]\n', 2, "list"),
        ("rows.jsonl", '{"prompt": "a"}\n\nnull\n', 3, "null"),
        ("rows.json", '[{"prompt": "a"}, {"prompt": "b"}, "c"]', 3, "str"),
    ],
)
def test_row_that_is_not_an_object(
    tmp_path: Path, name: str, content: str, row: int, got: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(
        DataError, match=rf"{re.escape(name)}: row {row}: expected a JSON object, got {got}$"
    ):
        load_records(path, "prompt")


def test_json_file_must_hold_an_array(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text('{"data": [{"prompt": "a"}]}')
    with pytest.raises(
        DataError,
        match=r"obj\.json: expected a JSON array of row objects, got an object \(for one object per line, use \.jsonl\)",
    ):
        load_records(path, "prompt")


@pytest.mark.parametrize(
    ("name", "content"), [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "[]")]
)
def test_file_with_no_rows(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(
        DataError, match=rf"{re.escape(name)}: no rows; expected at least one record$"
    ):
        load_records(path, "prompt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file$"):
        read_rows(tmp_path / "nope.jsonl")  # raised at the call, before any row is asked for


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt\nHi\n")
    with pytest.raises(
        DataError,
        match=r"data\.csv: unknown format '\.csv'; expected \.jsonl, \.json, \.parquet or a directory written by datasets' save_to_disk",
    ):
        read_rows(path)


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file: "):
        load_records(path, "prompt")


def test_directory_not_written_by_save_to_disk(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(
        DataError, match=r"plain: a directory, but not one written by datasets' save_to_disk"
    ):
        read_rows(tmp_path / "plain")


def test_dataset_dict_without_the_split(tmp_path: Path) -> None:
    only_test = {"test": datasets.Dataset.from_list([{"prompt": "a"}])}
    datasets.DatasetDict(only_test).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: no split 'train'; it has test \(pass split=\.\.\.\)"):
        read_rows(tmp_path / "dd")


def test_bad_row_in_a_dataset_dir_is_numbered_from_one(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: row 2: field 'completion': empty or whitespace-only"):
        load_records(tmp_path / "ds", "completion")


def test_parquet_null_filled_message_keys_are_ignored_but_real_ones_are_not(tmp_path: Path) -> None:
    # Arrow gives every message the union of keys, so row 1's message gets "name": None.
    rows = [{"messages": [USER, BOT]}, {"messages": [{**USER, "name": "ann"}, BOT]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    [first] = load_records(tmp_path / "chats.parquet", "conversation", limit=1)
    assert first.messages == [USER, BOT]
    with pytest.raises(
        DataError, match=r"chats\.parquet: row 2: field 'messages\[0\]\.name': unexpected key"
    ):
        load_records(tmp_path / "chats.parquet", "conversation")


def test_unknown_kind_suggests_the_nearest(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(
        ValueError,
        match=r"unknown record kind 'preferences' \(did you mean 'preference'\?\); expected one of prompt, completion",
    ):
        load_records(path, "preferences")


def test_row_passed_to_parse_record_must_be_a_dict() -> None:
    with pytest.raises(
        DataError, match=r"^api: row 4: expected an object with named fields, got list$"
    ):
        parse_record(["Hi"], "prompt", source="api", row_number=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"text": "Hi"}, r"columns \(text\) match no record kind"),
        (
            {"prompt": "Hi", "chosen": "A", "responses": ["A", "B"]},
            r"columns \(prompt, chosen, responses\) fit preference and ranking",
        ),
        (
            {"prompt": "Hi", "messages": [USER]},
            r"columns \(prompt, messages\) fit conversation and prompt",
        ),
        (
            {"prompt": "Hi", "completion": "A", "chosen": "B"},
            r"columns \(prompt, completion, chosen\) fit completion and preference",
        ),
    ],
)
def test_detect_kind_rejects_unknown_and_ambiguous_rows(row: dict[str, Any], problem: str) -> None:
    with pytest.raises(
        DataError,
        match=rf"^x\.jsonl: row 5: {problem}; accepted shapes are prompt: prompt; completion: prompt, completion; conversation: messages; preference: prompt, chosen, rejected; ranking: prompt, responses; labeled: prompt, completion, label$",
    ):
        detect_kind(row, source="x.jsonl", row_number=5)


def test_data_error_survives_pickling() -> None:
    # Errors raised in worker processes (datasets.map, DataLoader) are pickled to reach the parent.
    err = pickle.loads(
        pickle.dumps(DataError("f.jsonl", 3, "chosen", "expected a string, got int"))
    )
    assert (err.source, err.row, err.field, err.problem) == (
        "f.jsonl",
        3,
        "chosen",
        "expected a string, got int",
    )
    assert str(err) == "f.jsonl: row 3: field 'chosen': expected a string, got int"


@pytest.mark.parametrize(
    ("rows", "kinds", "problem"),
    [
        (
            [{"prompt": "Hi"}],
            ("completion", "conversation"),
            "missing field 'completion'; this recipe reads {prompt, completion} or {messages} rows "
            "(this row has prompt)",
        ),
        (
            [{"prompt": "Hi", "completion": "Yo", "id": 1}],
            ("preference",),
            "missing fields 'chosen', 'rejected'; this recipe reads {prompt, chosen, rejected} "
            "rows (this row has prompt, completion, id)",
        ),
        (
            [{"prompt": "Hi", "completion": "Yo"}],
            ("preference", "labeled"),
            "missing field 'label'; this recipe reads {prompt, chosen, rejected} or "
            "{prompt, completion, label} rows (this row has prompt, completion)",
        ),
        (
            [{"prompt": "Hi", "completion": "Yo", "label": True}],
            ("completion", "conversation"),
            "rows look like 'labeled' records; this recipe reads {prompt, completion} or "
            "{messages} rows",
        ),
    ],
)
def test_file_of_the_wrong_shape_names_the_missing_fields(
    tmp_path: Path, rows: list[dict[str, Any]], kinds: tuple[str, ...], problem: str
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as caught:
        load_train_eval(str(path), kinds=kinds)
    assert str(caught.value) == f"{path}: row 1: {problem}"


def test_later_row_missing_its_completion_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Yo"}) + '\n{"prompt": "Hey"}\n')
    with pytest.raises(DataError) as caught:
        load_train_eval(str(path), kinds=("completion", "conversation"))
    assert str(caught.value) == (
        f"{path}: row 2: field 'completion': missing; a completion row needs prompt, completion "
        "(this row has prompt)"
    )


def test_max_chars_refuses_a_long_text_as_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "p" * 100}, {"prompt": "q" * 101}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(load_records(path, "prompt", max_chars=101)) == 2
    with pytest.raises(DataError) as caught:
        load_records(path, "prompt", max_chars=100)
    assert (
        str(caught.value)
        == f"{path}: row 2: field 'prompt': 101 characters, more than max_chars=100"
    )
    assert len(load_records(path, "prompt", limit=1, max_chars=100)) == 1


@pytest.mark.parametrize(
    ("kind", "row", "field", "problem"),
    [
        (
            "prompt",
            {"prompt": [{"role": "system", "content": "s" * 60}, {"role": "user", "content": "u" * 50}]},
            "prompt[1].content",
            "prompt[0] to prompt[1] are 110 characters together, more than max_chars=100",
        ),
        ("completion", {"prompt": "Hi", "completion": "c" * 101}, "completion", "101 characters, more than max_chars=100"),
        ("ranking", {"prompt": "Hi", "responses": ["a", "r" * 101]}, "responses[1]", "101 characters, more than max_chars=100"),
        (
            "conversation",
            {"messages": [{"role": "user", "content": "u" * 99}, {"role": "assistant", "content": "ab"}]},
            "messages[1].content",
            "messages[0] to messages[1] are 101 characters together, more than max_chars=100",
        ),
    ],
)  # fmt: skip
def test_max_chars_names_the_text_that_passes_it(
    tmp_path: Path, kind: str, row: dict[str, Any], field: str, problem: str
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as caught:
        load_records(path, kind, max_chars=100)
    assert str(caught.value) == f"{path}: row 1: field '{field}': {problem}"


def test_max_chars_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    with pytest.raises(ValueError, match=r"max_chars must be a positive integer or None, got 0"):
        load_records(path, "prompt", max_chars=0)
