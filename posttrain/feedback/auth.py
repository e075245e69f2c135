"""Login tokens, browser sessions and CSRF tokens.

A login token is 32 random bytes (`secrets.token_urlsafe`), shown once when an admin creates
the annotator; the database keeps only its sha256. A slow password hash (bcrypt, scrypt)
would add nothing: it protects guessable passwords, and a 256-bit random token cannot be
guessed, so a plain hash already makes a stolen database useless for logging in. Looking the
hash up by index is not constant-time, but what it could leak is a prefix of a hash, not of
a token; the final comparison uses `hmac.compare_digest` anyway.

A token authenticates two ways:
- `Authorization: Bearer <token>` on each request (scripts, the CLI's peers). A browser never
  attaches this header by itself, so such requests need no CSRF token.
- `POST /api/login` trades it for a session cookie (HttpOnly, SameSite=Strict). A cookie is
  attached by the browser to any request to this host, so every state-changing request of a
  session must also carry the session's CSRF token in the `X-CSRF-Token` header, which a page
  of another origin can neither read nor set.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from posttrain.feedback.db import Annotator, LoginSession, NameTaken, now

SESSION_SECONDS = 12 * 3600
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """`name` if it is a valid annotator name; ValueError saying what one looks like."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"annotator name {name!r}: expected 1 to 64 letters, digits or _ . @ -, "
            "starting with a letter or digit"
        )
    return name


def create_annotator(db: Session, name: str, *, admin: bool = False) -> tuple[Annotator, str]:
    """A new annotator and their login token (not stored: show it to them once).
    NameTaken if the name is taken, ValueError if it is malformed. The caller commits."""
    check_name(name)
    if db.scalar(select(Annotator).where(Annotator.name == name)) is not None:
        raise NameTaken(f"annotator {name!r} exists already; pick another name")
    token = new_token()
    annotator = Annotator(name=name, token_hash=hash_token(token), is_admin=admin, revoked=False)
    db.add(annotator)
    db.flush()
    return annotator, token


def revoke(db: Session, name: str) -> Annotator:
    """Stop `name`'s token and end their sessions; their labels stay. The caller commits."""
    annotator = db.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None:
        raise ValueError(f"no annotator named {name!r}")
    annotator.revoked = True
    db.execute(delete(LoginSession).where(LoginSession.annotator_id == annotator.id))
    return annotator


def annotator_for_token(db: Session, token: str) -> Annotator | None:
    """The (not revoked) annotator whose token this is, or None."""
    if not token:
        return None
    digest = hash_token(token)
    annotator = db.scalar(select(Annotator).where(Annotator.token_hash == digest))
    if annotator is None or annotator.revoked:
        return None
    return annotator if hmac.compare_digest(annotator.token_hash, digest) else None


def start_session(db: Session, annotator: Annotator) -> tuple[str, str]:
    """`(cookie value, CSRF token)` of a new session for `annotator`, expired sessions of
    anyone deleted on the way; the caller commits."""
    db.execute(delete(LoginSession).where(LoginSession.expires_at <= now()))
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    db.add(
        LoginSession(
            id_hash=hash_token(session_id),
            annotator_id=annotator.id,
            csrf_token=csrf,
            expires_at=now() + SESSION_SECONDS,
        )
    )
    return session_id, csrf


def session_for_cookie(db: Session, session_id: str) -> LoginSession | None:
    """The live session whose cookie value this is, or None (unknown, expired, revoked)."""
    if not session_id:
        return None
    session = db.get(LoginSession, hash_token(session_id))
    if session is None or session.expires_at <= now():
        return None
    annotator = db.get(Annotator, session.annotator_id)
    return None if annotator is None or annotator.revoked else session


def end_session(db: Session, session_id: str) -> None:
    db.execute(delete(LoginSession).where(LoginSession.id_hash == hash_token(session_id)))


def csrf_matches(session: LoginSession, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(session.csrf_token.encode(), header.encode())
