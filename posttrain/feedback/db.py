"""The feedback app's tables, its engine and its schema upgrades.

Times are Unix seconds (float) so lease arithmetic is the same on SQLite and PostgreSQL, with
no timezone to get wrong; texts that are lists (responses, a ranking, flags) are JSON strings.

SQLite is opened in WAL mode (readers never wait for the writer), with a 30 s busy timeout,
foreign keys on and `synchronous=FULL` (a commit is on disk before the HTTP answer, so neither
a killed server nor a power cut loses an acknowledged label). Every SQLite transaction starts
with `BEGIN IMMEDIATE`: it takes the write lock up front, so two annotators' lease requests run
one after the other and cannot both take an item's last free slot (a deferred transaction that
read first would instead fail with SQLITE_BUSY when it tried to write). Requests that only read
(pages, progress, statistics) use a second engine whose transactions begin deferred: in WAL
mode they read a snapshot and take no lock. On PostgreSQL the writers' ordering comes from
locking the project row (`assign.py`).

The schema is Alembic's (`migrations/`): `upgrade()` brings any database to the newest
revision, with a Config built here, so users need no alembic.ini.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
MODES = ("rank", "pair")


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    """Someone who labels; an admin may also create projects, annotators and exports."""

    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the login token, hex; the token itself is shown once and never stored."""
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LoginSession(Base):
    """A browser session: the cookie's value (hashed) and the CSRF token its requests carry."""

    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(
        ForeignKey("annotators.id", ondelete="CASCADE"), index=True
    )
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)


class Project(Base):
    """Prompts with K responses each, to be ranked (or, K = 2, judged A / B / tie)."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    mode: Mapped[str] = mapped_column(String(8))
    """'rank' (order all K responses) or 'pair' (K = 2: A, B or tie)."""
    labels_per_item: Mapped[int] = mapped_column(Integer)
    """N: how many different annotators label each item."""
    lease_seconds: Mapped[float] = mapped_column(Float)
    """How long an offered item is held for its annotator before it returns to the pool."""
    shuffle: Mapped[bool] = mapped_column(Boolean, default=True)
    """Show each annotator the responses in their own fixed random order (position bias)."""
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Item(Base):
    """One prompt and its responses; `key` is the sample's id (or its row) for exports."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("project_id", "position", name="uq_items_position"),
        UniqueConstraint("project_id", "key", name="uq_items_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(200))
    prompt_json: Mapped[str] = mapped_column(Text)
    """The prompt as JSON: a string, or a list of {role, content} messages."""
    responses_json: Mapped[str] = mapped_column(Text)

    @property
    def prompt(self) -> Any:
        return json.loads(self.prompt_json)

    @property
    def responses(self) -> list[str]:
        return json.loads(self.responses_json)


class Lease(Base):
    """An item offered to an annotator until `expires_at`. An expired lease still lets its
    holder submit until another annotator needs its slot and reclaims it (deletes the row)."""

    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_leases_item_annotator"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """Random (uuid4 hex): never reused, so a label can name the lease it answered."""
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(
        ForeignKey("annotators.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)


class Label(Base):
    """One annotator's judgment of one item; at most one per (item, annotator)."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_labels_item_annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(
        ForeignKey("annotators.id", ondelete="CASCADE"), index=True
    )
    lease_id: Mapped[str] = mapped_column(String(32), unique=True)
    """The lease it answered: a retried submission finds its label here instead of adding one."""
    ranking_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Response indices best to worst (a pair: [winner, loser]); null for a tie."""
    tie: Mapped[bool] = mapped_column(Boolean, default=False)
    rationale: Mapped[str] = mapped_column(Text, default="")
    flags_json: Mapped[str] = mapped_column(Text, default="{}")
    """{flag: [response indices]}, flags from `FLAGS`."""
    created_at: Mapped[float] = mapped_column(Float, default=now)

    @property
    def ranking(self) -> list[int] | None:
        return None if self.ranking_json is None else json.loads(self.ranking_json)

    @property
    def flags(self) -> dict[str, list[int]]:
        return json.loads(self.flags_json)


FLAGS = ("unsafe", "factually_wrong")


class NameTaken(ValueError):
    """An annotator or project name that is in use already (HTTP 409, not 422)."""


def make_engine(url: str, *, writer: bool = True) -> Engine:
    """An engine for `url` (sqlite:///path.db or postgresql+psycopg://...), SQLite tuned as the
    module docstring says; ValueError for an in-memory SQLite database, which would vanish with
    its connection. `writer=False`: SQLite transactions begin deferred, as readers that take no
    lock (WAL), so pages and statistics never hold up a submission."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if parsed.database in (None, "", ":memory:"):
        raise ValueError(f"{url}: an in-memory database loses every label; give a file path")
    Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=10,
        max_overflow=30,
        pool_timeout=60,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy issues BEGIN itself, below
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "busy_timeout=30000",
            "foreign_keys=ON",
            "synchronous=FULL",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    # Writers of this process queue on a lock before BEGIN IMMEDIATE: SQLite's own busy
    # handler polls with growing sleeps (up to 100 ms), so a crowd of waiting writers would
    # mostly sleep while the database sits unlocked. The lock is taken at a connection's first
    # BEGIN and released when the connection goes back to the pool (after its commit or
    # rollback). Other processes (the CLI) still meet SQLite's busy timeout.
    write_lock = threading.Lock()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if not writer:
            connection.exec_driver_sql("BEGIN")
            return
        if not connection.info.get("holds_write_lock"):
            write_lock.acquire()
            connection.info["holds_write_lock"] = True
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "checkin")
    def _release(_dbapi_connection: Any, record: Any) -> None:
        if record.info.pop("holds_write_lock", False):
            write_lock.release()

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    """Alembic's config for this package's migrations, built in code (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database's schema to `revision` (default: the newest)."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_database(url: str) -> sessionmaker[Session]:
    """A session factory for `url`, its schema upgraded to the newest revision first."""
    engine = make_engine(url)
    upgrade(engine)
    return session_factory(engine)


def open_reader(url: str) -> sessionmaker[Session]:
    """A session factory for reading `url` (see `make_engine`'s `writer`); nothing it does
    should write."""
    return session_factory(make_engine(url, writer=False))
