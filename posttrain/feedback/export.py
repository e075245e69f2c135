"""A project's labels as the files `posttrain rm` and `posttrain dpo` read, unconverted.

- `rankings.jsonl`: one row per label, `{"id", "prompt", "responses": [best, ..., worst]}`,
  the form `posttrain rm` trains on (`data.train=.../rankings.jsonl`).
- `pairs.jsonl`: `{"id", "prompt", "chosen", "rejected"}`, the form `posttrain dpo` (and rm)
  reads. A pair project gives one row per A/B label; a rank project gives every two responses
  of each ranking, the better one chosen (K(K-1)/2 rows per label).
- Ties (pair projects) are no preference: they are left out of both files and counted in
  `summary.json`.

Labels are not aggregated: an item labelled by N annotators appears N times, once per
annotator, so disagreements stay in the data (a Bradley-Terry reward model fitted to them
learns a preference of less than certainty) and nothing is decided by a vote. Rows are in
item order, then in the order the labels came in. Extra fields the trainers ignore: `item`
(the sample's id), `annotator`, `rationale`, and the flags (`unsafe`, `factually_wrong`) of
each response: `flags` (a list per response of `responses`) or `chosen_flags` /
`rejected_flags`. Ids are `<item>/<annotator>` (pairs of a ranking: `.../<better>><worse>`,
response indices as imported), unique within each file, as the loaders require.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from posttrain.feedback.agreement import Judgment, agreement_report
from posttrain.feedback.db import FLAGS, Annotator, Item, Label, Project
from posttrain.files import write_json_atomic, write_jsonl_atomic


def read_labels(db: Session, project: Project) -> list[tuple[Item, Label, str]]:
    """(item, label, annotator name) of every label of `project`, in export order."""
    rows = db.execute(
        select(Item, Label, Annotator.name)
        .join(Label, Label.item_id == Item.id)
        .join(Annotator, Annotator.id == Label.annotator_id)
        .where(Item.project_id == project.id)
        .order_by(Item.position, Label.id)
    ).all()
    return [(item, label, name) for item, label, name in rows]


def project_agreement(db: Session, project: Project) -> dict[str, Any]:
    """`agreement.agreement_report` of the project's labels."""
    judgments = [
        Judgment(
            item=item.id,
            annotator=name,
            ranking=None if label.ranking is None else tuple(label.ranking),
            k=len(item.responses),
        )
        for item, label, name in read_labels(db, project)
    ]
    return agreement_report(judgments, project.mode)


def _flags_of(label: Label, response: int) -> list[str]:
    flags = label.flags
    return [name for name in FLAGS if response in flags.get(name, [])]


def export_rows(
    labels: list[tuple[Item, Label, str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """`(rankings rows, pairs rows, ties left out)` of `read_labels`'s labels."""
    rankings, pairs, ties = [], [], 0
    for item, label, name in labels:
        ranking = label.ranking
        if ranking is None:
            ties += 1
            continue
        texts = item.responses
        common = {"item": item.key, "annotator": name, "rationale": label.rationale}
        rankings.append(
            {
                "id": f"{item.key}/{name}",
                "prompt": item.prompt,
                "responses": [texts[i] for i in ranking],
                **common,
                "flags": [_flags_of(label, i) for i in ranking],
            }
        )
        for better, worse in combinations(ranking, 2):
            pair_id = (
                f"{item.key}/{name}" if len(ranking) == 2 else f"{item.key}/{name}/{better}>{worse}"
            )
            pairs.append(
                {
                    "id": pair_id,
                    "prompt": item.prompt,
                    "chosen": texts[better],
                    "rejected": texts[worse],
                    **common,
                    "chosen_flags": _flags_of(label, better),
                    "rejected_flags": _flags_of(label, worse),
                }
            )
    return rankings, pairs, ties


def write_export(db: Session, project: Project, out_dir: str | Path) -> dict[str, Any]:
    """Write `rankings.jsonl`, `pairs.jsonl` and `summary.json` to `out_dir`; the summary."""
    out = Path(out_dir)
    labels = read_labels(db, project)
    rankings, pairs, ties = export_rows(labels)
    summary = {
        "project": project.name,
        "mode": project.mode,
        "labels": len(labels),
        "rankings": len(rankings),
        "pairs": len(pairs),
        "ties_left_out": ties,
        "rankings_file": str(write_jsonl_atomic(out / "rankings.jsonl", rankings)),
        "pairs_file": str(write_jsonl_atomic(out / "pairs.jsonl", pairs)),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
