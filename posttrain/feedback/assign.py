"""Which item an annotator gets next, and taking their label for it.

The rules (docs/feedback.md, "Leasing"):
- An item is offered to annotator X only if X has not labelled it and its labels plus its
  live leases number fewer than the project's N.
- X holds at most one lease per project. Asking again (a reloaded page, a second tab) returns
  that same lease, renewed, so a closed tab loses no work.
- A lease lasts the project's `lease_seconds`. Once expired it no longer counts against N, so
  the item returns to the pool and a closed tab blocks nothing. Its holder may still submit
  until another annotator needs the slot: then the expired lease is deleted ("reclaimed").
- Items are offered fullest first (labels + live leases), then in file order, so items reach
  N labels one after another instead of all of them staying one label short.
- A submission needs X's lease, live or expired but not reclaimed. It is one transaction: the
  label is written and the lease deleted together; (item, annotator) is unique in the labels
  table, so a duplicate cannot be stored even by a bug above it. A retried submission (an
  answer lost to a dropped connection) finds the label its lease already made and adds none.

Every function takes the time `at` (default: now) so tests can move the clock, and leaves the
commit to its caller: the HTTP handler commits before it answers.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from posttrain.feedback.db import FLAGS, Annotator, Item, Label, Lease, Project, now

MAX_RATIONALE = 5000


class LeaseError(Exception):
    """A refused lease or submission: the HTTP status it maps to and what went wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Offer:
    lease: Lease
    item: Item
    order: list[int]
    """The item's response indices in the order this annotator is shown them."""


def display_order(item_id: int, annotator_id: int, k: int, shuffle: bool) -> list[int]:
    """The order `annotator_id` sees item `item_id`'s `k` responses: random against position
    bias, but the same on every reload (seeded by the pair; string seeds hash with sha512, so
    the order is the same in every process)."""
    order = list(range(k))
    if shuffle:
        random.Random(f"{item_id}:{annotator_id}").shuffle(order)
    return order


def _lock(db: Session, project_id: int) -> bool:
    """Serialize lease decisions within a project on PostgreSQL by locking its row; False on
    SQLite, where the transaction's BEGIN IMMEDIATE already holds the only write lock."""
    if db.get_bind().dialect.name == "sqlite":
        return False
    db.execute(select(Project.id).where(Project.id == project_id).with_for_update())
    return True


def _offer(item: Item, lease: Lease, project: Project) -> Offer:
    k = len(item.responses)
    return Offer(lease, item, display_order(item.id, lease.annotator_id, k, project.shuffle))


def _open_items(project: Project, annotator: Annotator, at: float) -> Any:
    """Items `annotator` may be offered at time `at`, fullest first."""
    labels = select(func.count()).where(Label.item_id == Item.id).correlate(Item).scalar_subquery()
    live = (
        select(func.count())
        .where(Lease.item_id == Item.id, Lease.expires_at > at)
        .correlate(Item)
        .scalar_subquery()
    )
    mine = exists().where(Label.item_id == Item.id, Label.annotator_id == annotator.id)
    return (
        select(Item)
        .where(Item.project_id == project.id, ~mine, labels + live < project.labels_per_item)
        .order_by((labels + live).desc(), Item.position)
    )


def lease_next(
    db: Session, project: Project, annotator: Annotator, *, at: float | None = None
) -> Offer | None:
    """The item `annotator` should label next in `project`, leased to them; None when nothing
    is left for them (every item labelled by them or holding N labels and live leases)."""
    at = now() if at is None else at
    _lock(db, project.id)
    held = db.scalar(
        select(Lease)
        .join(Item, Item.id == Lease.item_id)
        .where(Item.project_id == project.id, Lease.annotator_id == annotator.id)
        .order_by(Lease.created_at)
        .limit(1)
    )
    if held is not None:
        held.expires_at = at + project.lease_seconds
        return _offer(db.get(Item, held.item_id), held, project)  # type: ignore[arg-type]
    item = db.scalar(_open_items(project, annotator, at).limit(1))
    if item is None:
        return None
    labels = db.scalar(select(func.count()).where(Label.item_id == item.id)) or 0
    leases = db.scalars(
        select(Lease).where(Lease.item_id == item.id).order_by(Lease.expires_at)
    ).all()
    live = [lease for lease in leases if lease.expires_at > at]
    expired = [lease for lease in leases if lease.expires_at <= at]
    # Reclaim the oldest expired leases, but only as many as the new one needs room for: a
    # late annotator keeps their chance to submit while the item has slots to spare.
    excess = labels + len(live) + len(expired) + 1 - project.labels_per_item
    for lease in expired[: max(0, excess)]:
        db.delete(lease)
    db.flush()
    lease = Lease(
        id=uuid.uuid4().hex,
        item_id=item.id,
        annotator_id=annotator.id,
        created_at=at,
        expires_at=at + project.lease_seconds,
    )
    db.add(lease)
    db.flush()
    return _offer(item, lease, project)


def find_lease(db: Session, lease_id: str, annotator: Annotator) -> Offer:
    """`annotator`'s lease `lease_id` (to show its item again); 403 if it is someone else's,
    404 if there is none."""
    lease = db.get(Lease, lease_id)
    if lease is None:
        raise LeaseError(404, f"no lease {lease_id!r}: it was submitted, or reclaimed after expiry")
    if lease.annotator_id != annotator.id:
        raise LeaseError(403, f"lease {lease_id!r} belongs to another annotator")
    item = db.get(Item, lease.item_id)
    return _offer(item, lease, db.get(Project, item.project_id))  # type: ignore[arg-type]


def check_answer(
    mode: str, k: int, ranking: list[int] | None, tie: bool, flags: dict[str, list[int]]
) -> tuple[list[int] | None, dict[str, list[int]]]:
    """The answer's ranking and flags, normalized; LeaseError 422 naming the field if it does
    not fit a `mode` item with `k` responses."""
    if tie:
        if mode != "pair":
            raise LeaseError(422, "tie: only a 'pair' project has ties; rank all responses")
        if ranking is not None:
            raise LeaseError(422, "ranking: a tie has no ranking; send one or the other")
    elif ranking is None or sorted(ranking) != list(range(k)):
        raise LeaseError(
            422,
            f"ranking: expected each response index 0..{k - 1} exactly once, best first, "
            f"got {ranking}",
        )
    clean: dict[str, list[int]] = {}
    for name, indices in flags.items():
        if name not in FLAGS:
            raise LeaseError(422, f"flags.{name}: unknown flag; expected one of {', '.join(FLAGS)}")
        if any(not 0 <= i < k for i in indices):
            raise LeaseError(422, f"flags.{name}: expected response indices 0..{k - 1}")
        if indices:
            clean[name] = sorted(set(indices))
    return ranking, clean


def submit(
    db: Session,
    lease_id: str,
    annotator: Annotator,
    *,
    ranking: list[int] | None,
    tie: bool = False,
    rationale: str = "",
    flags: dict[str, list[int]] | None = None,
    at: float | None = None,
) -> tuple[Label, bool]:
    """Store `annotator`'s answer to lease `lease_id`: `(label, True)`, or `(label, False)` for
    a retry of a submission already stored. LeaseError: 403 for another annotator's lease,
    409 for a lease that is gone, 422 for an answer that does not fit the item."""
    at = now() if at is None else at
    done = db.scalar(select(Label).where(Label.lease_id == lease_id))
    if done is not None:
        if done.annotator_id != annotator.id:
            raise LeaseError(403, f"lease {lease_id!r} belongs to another annotator")
        return done, False
    lease = db.get(Lease, lease_id)
    if lease is None:
        raise LeaseError(
            409,
            f"lease {lease_id!r} is gone: it expired and its item went to another annotator; "
            "ask for the next item",
        )
    if lease.annotator_id != annotator.id:
        raise LeaseError(403, f"lease {lease_id!r} belongs to another annotator")
    item = db.get(Item, lease.item_id)
    project = db.get(Project, item.project_id)  # type: ignore[union-attr]
    # Project first, then the lease: the order lease_next takes them in (no deadlock on PG).
    if _lock(db, project.id):  # type: ignore[union-attr]
        lease = db.get(Lease, lease_id, with_for_update=True, populate_existing=True)
        if lease is None:  # reclaimed while we waited for the lock
            raise LeaseError(409, f"lease {lease_id!r} was reclaimed; ask for the next item")
    if len(rationale) > MAX_RATIONALE:
        raise LeaseError(422, f"rationale: {len(rationale)} characters; at most {MAX_RATIONALE}")
    ranking, clean_flags = check_answer(
        project.mode,  # type: ignore[union-attr]
        len(item.responses),  # type: ignore[union-attr]
        ranking,
        tie,
        flags or {},
    )
    labels = db.scalar(select(func.count()).where(Label.item_id == lease.item_id)) or 0
    if labels >= project.labels_per_item:  # type: ignore[union-attr]
        raise LeaseError(409, "this item has all its labels already; ask for the next item")
    label = Label(
        item_id=lease.item_id,
        annotator_id=annotator.id,
        lease_id=lease.id,
        ranking_json=None if ranking is None else json.dumps(ranking),
        tie=tie,
        rationale=rationale,
        flags_json=json.dumps(clean_flags),
        created_at=at,
    )
    db.add(label)
    db.delete(lease)
    db.flush()
    return label, True


def progress(
    db: Session,
    project: Project,
    annotator: Annotator,
    *,
    with_open: bool = True,
    at: float | None = None,
) -> dict[str, int]:
    """`annotator`'s progress in `project`: items they labelled, items in all and (unless
    `with_open` is False: it scans every item) items open to them now."""
    at = now() if at is None else at
    mine = db.scalar(
        select(func.count())
        .select_from(Label)
        .join(Item, Item.id == Label.item_id)
        .where(Item.project_id == project.id, Label.annotator_id == annotator.id)
    )
    items = db.scalar(select(func.count()).where(Item.project_id == project.id))
    counts = {"labelled": mine or 0, "items": items or 0}
    if with_open:
        query = select(func.count()).select_from(_open_items(project, annotator, at).subquery())
        counts["open"] = db.scalar(query) or 0
    return counts
