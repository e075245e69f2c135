"""The feedback app's parts without HTTP: agreement arithmetic by hand, the leasing rules on a
real SQLite file with the clock passed in, token hashing, the export's rows, the schema."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from posttrain.data.loading import load_records
from posttrain.data.records import DataError
from posttrain.feedback import assign, auth
from posttrain.feedback.agreement import (
    Judgment,
    agreement_report,
    krippendorff_alpha,
    units_of,
)
from posttrain.feedback.db import (
    Base,
    Label,
    Lease,
    NameTaken,
    make_engine,
    open_database,
    upgrade,
)
from posttrain.feedback.export import write_export
from posttrain.feedback.projects import create_project, parse_samples, read_samples

# ---- agreement


def test_alpha_on_krippendorffs_worked_example():
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4
    observers, 12 units, missing values; published alpha nominal 0.743, ordinal 0.815,
    interval 0.849. (The `krippendorff` package 0.9.0 gives the same to 1e-12.)"""
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3]
    c = [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]
    units = [[r[u] for r in (a, b, c, d) if r[u] is not None] for u in range(12)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_by_hand():
    """Units [0,1], [1,2], [0,0], [2,2]. Coincidences (each pair counted both ways, / (m-1) = 1):
    o = [[2,1,0],[1,0,1],[0,1,2]], n_c = [3,2,3], n = 8.
    nominal: observed sum = o01+o10+o12+o21 = 4; expected = 2(3*2 + 2*3 + 3*3) = 42;
      alpha = 1 - 7*4/42 = 1/3.
    ordinal: d2(0,1) = (3+2 - 5/2)^2 = 6.25, d2(1,2) = (2+3 - 5/2)^2 = 6.25,
      d2(0,2) = (3+2+3 - 3)^2 = 25; observed = 2*6.25 + 2*6.25 = 25;
      expected = 2*6*6.25 + 2*6*6.25 + 2*9*25 = 600; alpha = 1 - 7*25/600 = 17/24.
    interval: d2 = (c-k)^2; observed = 4; expected = 12 + 12 + 72 = 96; 1 - 28/96 = 17/24."""
    units = [[0, 1], [1, 2], [0, 0], [2, 2]]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(1 / 3)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(17 / 24)
    assert krippendorff_alpha(units, "interval") == pytest.approx(17 / 24)
    assert krippendorff_alpha([[0, 0], [1, 1]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # one value: no expected disagreement
    assert krippendorff_alpha([[0], [1]]) is None  # nobody else coded a unit


def test_rank_agreement_by_hand():
    """Item 1 (K=3): alice [0,1,2], bob [0,2,1], carol [2,1,0]. On the pairs (0,1), (0,2),
    (1,2): alice/bob agree on 2 of 3, alice/carol on 0, bob/carol on 1 ((1,2): both put 2
    above 1). Project 3/9; alice (2+0)/6, bob (2+1)/6, carol (0+1)/6."""
    judgments = [
        Judgment(1, "alice", (0, 1, 2), 3),
        Judgment(1, "bob", (0, 2, 1), 3),
        Judgment(1, "carol", (2, 1, 0), 3),
        Judgment(2, "alice", (1, 0, 2), 3),  # nobody else labelled item 2
    ]
    report = agreement_report(judgments, "rank")
    assert report["pairwise_agreement"] == pytest.approx(3 / 9)
    people = report["annotators"]
    assert people["alice"]["pairwise_agreement"] == pytest.approx(2 / 6)
    assert people["bob"]["pairwise_agreement"] == pytest.approx(3 / 6)
    assert people["carol"]["pairwise_agreement"] == pytest.approx(1 / 6)
    assert (people["alice"]["labels"], people["alice"]["shared_items"]) == (2, 1)
    assert report["items_with_2_or_more_labels"] == 1
    # alpha's units are (item, response) with the position as the value
    assert sorted(units_of(judgments[:2], "rank")) == [[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]]
    assert report["alpha"] == pytest.approx(krippendorff_alpha(units_of(judgments, "rank")))
    without_carol = krippendorff_alpha(units_of(judgments[:2] + judgments[3:], "rank"))
    assert people["carol"]["alpha_without"] == pytest.approx(without_carol)
    assert without_carol > report["alpha"]  # carol disagrees with the others


def test_pair_agreement_counts_ties_as_their_own_answer():
    """Item 1: alice prefers the first response (value 0), bob says tie (1): disagree. Item 2:
    both prefer the second (value 2): agree. Pairwise 1/2; alpha's units [0,1] and [2,2]."""
    judgments = [
        Judgment(1, "alice", (0, 1), 2),
        Judgment(1, "bob", None, 2),
        Judgment(2, "alice", (1, 0), 2),
        Judgment(2, "bob", (1, 0), 2),
    ]
    assert units_of(judgments, "pair") == [[0.0, 1.0], [2.0, 2.0]]
    assert agreement_report(judgments, "pair")["pairwise_agreement"] == pytest.approx(0.5)


# ---- tokens


@pytest.fixture
def db(tmp_path):
    with open_database(f"sqlite:///{tmp_path / 'feedback.db'}")() as session:
        yield session


def test_tokens_are_stored_only_as_their_sha256(db, tmp_path):
    annotator, token = auth.create_annotator(db, "alice")
    db.commit()
    assert len(token) >= 43  # 32 random bytes, base64url
    assert annotator.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert auth.hash_token("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    raw = (tmp_path / "feedback.db").read_bytes() + (tmp_path / "feedback.db-wal").read_bytes()
    assert token.encode() not in raw and annotator.token_hash.encode() in raw
    assert auth.annotator_for_token(db, token).name == "alice"
    assert auth.annotator_for_token(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert auth.annotator_for_token(db, "") is None
    with pytest.raises(NameTaken, match="exists already"):
        auth.create_annotator(db, "alice")
    with pytest.raises(ValueError, match="annotator name '<b>'"):
        auth.create_annotator(db, "<b>")
    auth.revoke(db, "alice")
    db.commit()
    assert auth.annotator_for_token(db, token) is None


def test_sessions_and_csrf_tokens(db):
    alice, _ = auth.create_annotator(db, "alice")
    cookie, csrf = auth.start_session(db, alice)
    db.commit()
    session = auth.session_for_cookie(db, cookie)
    assert session is not None and session.id_hash == auth.hash_token(cookie)
    assert auth.csrf_matches(session, csrf)
    assert not auth.csrf_matches(session, csrf + "x")
    assert not auth.csrf_matches(session, None)
    assert auth.session_for_cookie(db, "forged") is None
    session.expires_at = 0.0
    db.commit()
    assert auth.session_for_cookie(db, cookie) is None


# ---- leasing


def _project(db, n_items=2, n=2, lease_seconds=10.0, mode="rank", k=3):
    rows = [
        {"id": f"q{i}", "prompt": f"prompt {i}", "responses": [f"r{i}-{j}" for j in range(k)]}
        for i in range(n_items)
    ]
    project = create_project(
        db,
        f"p{n_items}-{n}-{mode}",
        parse_samples(rows, "test rows"),
        mode=mode,
        labels_per_item=n,
        lease_seconds=lease_seconds,
    )
    people = [auth.create_annotator(db, name)[0] for name in ("alice", "bob", "carol", "dave")]
    db.commit()
    return project, people


def test_items_go_to_n_annotators_and_never_twice_to_one(db):
    project, (alice, bob, carol, dave) = _project(db, n_items=2, n=2)
    first = assign.lease_next(db, project, alice, at=0)
    assert first.item.key == "q0"
    assign.submit(db, first.lease.id, alice, ranking=[2, 0, 1], at=1)
    # alice has labelled q0: she gets q1, never q0 again
    assert assign.lease_next(db, project, alice, at=2).item.key == "q1"
    # q0 (1 label) and q1 (alice's live lease) are equally full: file order decides
    assert assign.lease_next(db, project, bob, at=3).item.key == "q0"
    assert assign.lease_next(db, project, carol, at=4).item.key == "q1"
    assert assign.lease_next(db, project, dave, at=5) is None  # both have 2 labels or leases
    assert assign.progress(db, project, dave, at=5) == {"labelled": 0, "items": 2, "open": 0}


def test_asking_again_returns_the_same_lease_renewed(db):
    project, (alice, *_) = _project(db, lease_seconds=10.0)
    first = assign.lease_next(db, project, alice, at=0)
    again = assign.lease_next(db, project, alice, at=8)  # a reloaded tab
    assert again.lease.id == first.lease.id and again.lease.expires_at == 18
    assert again.order == first.order  # the same display order, too
    assert db.scalar(select(func.count()).select_from(Lease)) == 1


def test_an_expired_lease_returns_the_item_to_the_pool(db):
    project, (alice, bob, *_) = _project(db, n_items=1, n=1, lease_seconds=10.0)
    held = assign.lease_next(db, project, alice, at=0)
    assert assign.lease_next(db, project, bob, at=9) is None  # alice's lease is live
    taken = assign.lease_next(db, project, bob, at=11)  # expired: the slot is bob's now
    assert taken.item.id == held.item.id
    assert db.get(Lease, held.lease.id) is None  # reclaimed
    with pytest.raises(assign.LeaseError, match="is gone") as refused:
        assign.submit(db, held.lease.id, alice, ranking=[0, 1, 2], at=12)
    assert refused.value.status == 409
    assign.submit(db, taken.lease.id, bob, ranking=[0, 1, 2], at=12)


def test_an_expired_lease_is_kept_while_the_item_has_room(db):
    project, (alice, bob, *_) = _project(db, n_items=1, n=2, lease_seconds=10.0)
    held = assign.lease_next(db, project, alice, at=0)
    assert assign.lease_next(db, project, bob, at=11) is not None  # the second slot
    label, stored = assign.submit(db, held.lease.id, alice, ranking=[1, 0, 2], at=30)
    assert stored and label.ranking == [1, 0, 2]


def test_submissions_are_checked_and_never_duplicated(db):
    project, (alice, bob, *_) = _project(db, n_items=1, n=2)
    offer = assign.lease_next(db, project, alice, at=0)
    with pytest.raises(assign.LeaseError, match="another annotator") as refused:
        assign.submit(db, offer.lease.id, bob, ranking=[0, 1, 2])
    assert refused.value.status == 403
    for bad, message in [
        ([0, 1], r"ranking: expected each response index 0..2 exactly once"),
        ([0, 0, 1], "exactly once"),
        (None, "exactly once"),
    ]:
        with pytest.raises(assign.LeaseError, match=message):
            assign.submit(db, offer.lease.id, alice, ranking=bad)
    with pytest.raises(assign.LeaseError, match="only a 'pair' project has ties"):
        assign.submit(db, offer.lease.id, alice, ranking=None, tie=True)
    with pytest.raises(assign.LeaseError, match="flags.rude: unknown flag"):
        assign.submit(db, offer.lease.id, alice, ranking=[0, 1, 2], flags={"rude": [0]})
    first, stored = assign.submit(
        db, offer.lease.id, alice, ranking=[2, 1, 0], flags={"unsafe": [2, 2]}
    )
    db.commit()
    assert stored and first.flags == {"unsafe": [2]}
    retry, stored = assign.submit(db, offer.lease.id, alice, ranking=[0, 1, 2])
    assert not stored and retry.id == first.id and retry.ranking == [2, 1, 0]
    with pytest.raises(assign.LeaseError) as other:
        assign.submit(db, offer.lease.id, bob, ranking=[0, 1, 2])
    assert other.value.status == 403
    assert db.scalar(select(func.count()).select_from(Label)) == 1
    # the database refuses a second label of one item by one annotator, whatever the code does
    db.add(Label(item_id=first.item_id, annotator_id=alice.id, lease_id="x" * 32, tie=False))
    with pytest.raises(IntegrityError):
        db.flush()


def test_display_order_is_shuffled_per_annotator_and_stable():
    orders = {tuple(assign.display_order(7, a, 4, True)) for a in range(20)}
    assert len(orders) > 5  # annotators see different orders
    assert assign.display_order(7, 3, 4, True) == assign.display_order(7, 3, 4, True)
    assert assign.display_order(7, 3, 4, False) == [0, 1, 2, 3]


# ---- projects and export


def test_bad_samples_name_the_file_row_and_field(db, tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "responses": ["x", "y"]})
        + "\n"
        + json.dumps({"prompt": "b", "responses": ["x"]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"samples.jsonl: row 2: field 'responses': 1 response"):
        read_samples(path)
    three = parse_samples([{"prompt": "a", "responses": ["x", "y", "z"]}], "rows")
    with pytest.raises(DataError, match=r"rows: row 1: field 'responses': 3 responses; a 'pair'"):
        create_project(db, "pairs", three, mode="pair", source="rows")
    clash = parse_samples(
        [
            {"prompt": "a", "responses": ["x", "y"]},
            {"id": "row-1", "prompt": "b", "responses": ["x", "y"]},
        ],
        "rows",
    )
    with pytest.raises(DataError, match="row 2: field 'id'"):
        create_project(db, "clash", clash, source="rows")
    # the items table holds ids of up to 200 characters (PostgreSQL enforces it, SQLite not)
    long_id = parse_samples([{"id": "k" * 201, "prompt": "a", "responses": ["x", "y"]}], "rows")
    with pytest.raises(DataError, match="rows: row 1: field 'id': 201 characters; an item's id"):
        create_project(db, "long id", long_id, source="rows")
    rows = parse_samples([{"prompt": "a", "responses": ["x", "y"]}], "rows")
    for seconds in (float("inf"), float("nan"), 0.0):  # inf: a lease that never returns its item
        with pytest.raises(ValueError, match="expected a positive finite number"):
            create_project(db, "forever", rows, lease_seconds=seconds)
    create_project(db, "taken", rows)
    with pytest.raises(NameTaken, match="project 'taken' exists already"):
        create_project(db, "taken", rows)


def test_export_rows_load_as_rankings_and_pairs(db, tmp_path):
    project, (alice, bob, *_) = _project(db, n_items=1, n=2, k=3)
    for who, ranking in ((alice, [2, 0, 1]), (bob, [0, 2, 1])):
        offer = assign.lease_next(db, project, who)
        assign.submit(
            db,
            offer.lease.id,
            who,
            ranking=ranking,
            rationale="why",
            flags={"factually_wrong": [1]},
        )
    pairs_project = create_project(
        db,
        "ab",
        parse_samples([{"id": "z", "prompt": "p", "responses": ["A", "B"]}] * 1, "rows"),
        mode="pair",
        labels_per_item=2,
    )
    assign.submit(db, assign.lease_next(db, pairs_project, alice).lease.id, alice, ranking=[1, 0])
    assign.submit(
        db, assign.lease_next(db, pairs_project, bob).lease.id, bob, tie=True, ranking=None
    )
    db.commit()

    summary = write_export(db, project, tmp_path / "rank")
    rankings = [json.loads(line) for line in (tmp_path / "rank/rankings.jsonl").open()]
    assert rankings[0] == {
        "id": "q0/alice",
        "prompt": "prompt 0",
        "responses": ["r0-2", "r0-0", "r0-1"],
        "item": "q0",
        "annotator": "alice",
        "rationale": "why",
        "flags": [[], [], ["factually_wrong"]],
    }
    assert rankings[1]["responses"] == ["r0-0", "r0-2", "r0-1"]
    pairs = [json.loads(line) for line in (tmp_path / "rank/pairs.jsonl").open()]
    assert [(p["chosen"], p["rejected"]) for p in pairs[:3]] == [
        ("r0-2", "r0-0"),
        ("r0-2", "r0-1"),
        ("r0-0", "r0-1"),
    ]
    assert pairs[0]["id"] == "q0/alice/2>0" and pairs[2]["rejected_flags"] == ["factually_wrong"]
    assert summary | {"rankings_file": None, "pairs_file": None} == {
        "project": project.name,
        "mode": "rank",
        "labels": 2,
        "rankings": 2,
        "pairs": 6,
        "ties_left_out": 0,
        "rankings_file": None,
        "pairs_file": None,
    }
    assert len(load_records(tmp_path / "rank/rankings.jsonl", "ranking")) == 2
    assert len(load_records(tmp_path / "rank/pairs.jsonl", "preference")) == 6

    summary = write_export(db, pairs_project, tmp_path / "ab")
    assert (summary["pairs"], summary["rankings"], summary["ties_left_out"]) == (1, 1, 1)
    (pair,) = load_records(tmp_path / "ab/pairs.jsonl", "preference")
    assert (pair.id, pair.chosen, pair.rejected) == ("z/alice", "B", "A")


# ---- schema


def test_migrations_build_exactly_the_models_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    engine = make_engine(url)
    upgrade(engine)
    upgrade(engine)  # a second upgrade finds nothing to do
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with sqlite3.connect(tmp_path / "fresh.db") as raw:
        assert raw.execute("select version_num from alembic_version").fetchall() == [("0001",)]
        assert raw.execute("pragma journal_mode").fetchone() == ("wal",)
    with pytest.raises(ValueError, match="in-memory database"):
        make_engine("sqlite://")
