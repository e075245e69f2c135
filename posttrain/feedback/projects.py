"""Projects made from sample rows `{prompt, responses: [...], id?}`.

Rows are checked by the same validator the trainers use (`posttrain.data.records`, as
rankings: a prompt string or message list, at least two distinct non-empty responses), so a
bad row is refused when the project is made, naming its file, row and field, and whatever is
exported later loads without surprises. In the order given, the responses are not a ranking:
they are what the annotators will order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from posttrain.data.loading import load_records
from posttrain.data.records import DataError, RankingRecord, parse_record
from posttrain.feedback.db import MODES, Item, Label, NameTaken, Project

KEY_LENGTH = Item.__table__.c.key.type.length


def read_samples(path: str | Path) -> list[RankingRecord]:
    """The rows of a samples file (.jsonl, .json, .parquet); DataError names a bad row."""
    return load_records(path, "ranking")  # type: ignore[return-value]


def parse_samples(rows: Sequence[Any], source: str) -> list[RankingRecord]:
    """Rows sent as JSON (the admin API, the sampler); DataError names the bad row (1-based)."""
    records, seen = [], {}
    for number, row in enumerate(rows, start=1):
        record = parse_record(row, "ranking", source=source, row_number=number)
        if record.id is not None:
            if record.id in seen:
                problem = f"duplicate id {record.id!r}, already used in row {seen[record.id]}"
                raise DataError(source, number, "id", problem)
            seen[record.id] = number
        records.append(record)
    return records  # type: ignore[return-value]


def create_project(
    db: Session,
    name: str,
    records: Sequence[RankingRecord],
    *,
    mode: str = "rank",
    labels_per_item: int = 3,
    lease_seconds: float = 600.0,
    shuffle: bool = True,
    source: str = "samples",
) -> Project:
    """A project of `records`; NameTaken if the name is in use, ValueError (DataError for a
    row) if anything else is off. The caller commits."""
    if not name.strip() or len(name) > 100:
        raise ValueError(f"project name {name!r}: expected 1 to 100 characters")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if labels_per_item < 1:
        raise ValueError(f"labels_per_item={labels_per_item}: expected at least 1")
    if not (lease_seconds > 0 and math.isfinite(lease_seconds)):  # inf: a lease never ends
        raise ValueError(f"lease_seconds={lease_seconds}: expected a positive finite number")
    if not records:
        raise ValueError(f"{source}: no rows; a project needs at least one prompt")
    if db.scalar(select(Project).where(Project.name == name)) is not None:
        raise NameTaken(f"project {name!r} exists already; pick another name")
    keys: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        row = record.row or number
        if mode == "pair" and len(record.responses) != 2:
            problem = f"{len(record.responses)} responses; a 'pair' project needs exactly 2"
            raise DataError(source, row, "responses", problem)
        key = record.id if record.id is not None else f"row-{row}"
        if len(key) > KEY_LENGTH:  # SQLite would keep it; PostgreSQL would refuse the insert
            problem = f"{len(key)} characters; an item's id has at most {KEY_LENGTH}"
            raise DataError(source, row, "id", problem)
        if key in keys:
            problem = f"id {key!r} is also the generated id of row {keys[key]} (which has none)"
            raise DataError(source, row, "id", problem)
        keys[key] = row
    project = Project(
        name=name,
        mode=mode,
        labels_per_item=labels_per_item,
        lease_seconds=float(lease_seconds),
        shuffle=shuffle,
    )
    db.add(project)
    db.flush()
    db.add_all(
        Item(
            project_id=project.id,
            position=position,
            key=key,
            prompt_json=json.dumps(record.prompt),
            responses_json=json.dumps(record.responses),
        )
        for position, (key, record) in enumerate(zip(keys, records, strict=True))
    )
    db.flush()
    return project


def find_project(db: Session, name_or_id: str | int) -> Project:
    """The project with this name (or numeric id); ValueError listing the names if none."""
    project = db.scalar(select(Project).where(Project.name == str(name_or_id)))
    if project is None and str(name_or_id).isdigit():
        project = db.get(Project, int(name_or_id))
    if project is None:
        names = db.scalars(select(Project.name).order_by(Project.id)).all()
        raise ValueError(f"no project {name_or_id!r}; projects: {', '.join(names) or 'none yet'}")
    return project


def project_summary(db: Session, project: Project) -> dict[str, Any]:
    """Counts an admin watches: items, labels, items with all N labels."""
    items = db.scalar(select(func.count()).where(Item.project_id == project.id)) or 0
    per_item = (
        select(func.count().label("n"))
        .select_from(Label)
        .join(Item, Item.id == Label.item_id)
        .where(Item.project_id == project.id)
        .group_by(Label.item_id)
        .subquery()
    )
    labels = db.scalar(select(func.coalesce(func.sum(per_item.c.n), 0))) or 0
    complete = db.scalar(select(func.count()).where(per_item.c.n >= project.labels_per_item)) or 0
    return {
        "id": project.id,
        "name": project.name,
        "mode": project.mode,
        "labels_per_item": project.labels_per_item,
        "lease_seconds": project.lease_seconds,
        "items": items,
        "labels": int(labels),
        "complete_items": complete,
    }
