"""The feedback app over HTTP: the annotation and admin pages, and the JSON API they call.

Pages: `/` (log in, pick a project, label), `/admin` (annotators, projects, agreement,
exports); one script and one stylesheet under `/static/`. Every response carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline code, no
framing), so even a model output that slipped past the page's `textContent` rendering could
not run. API (JSON in and out; errors are `{"error": message}`):

    POST /api/login {token}               -> session cookie + {name, admin, csrf}
    POST /api/logout
    GET  /api/me                          -> {name, admin, csrf}
    GET  /api/projects                    -> projects with the caller's progress
    POST /api/projects/{id}/lease         -> the caller's next item (or {"lease": null})
    GET  /api/leases/{id}                 -> that item again (its holder only)
    POST /api/leases/{id}/label {ranking | tie, rationale?, flags?}
    admin: GET/POST /api/admin/annotators, POST /api/admin/annotators/{name}/revoke,
           GET/POST /api/admin/projects, GET /api/admin/projects/{id}/stats,
           GET /api/admin/projects/{id}/export/{rankings|pairs}.jsonl

A request body is at most `MAX_BODY` bytes (`MAX_PROJECT_BODY` for a new project's rows, which
are read only once the caller is known to be an admin) and must state its length.

Authentication and CSRF are `auth.py`'s; leasing is `assign.py`'s. Handlers are plain `def`s
(FastAPI runs them on its thread pool) and commit before they answer, so a 200 means the label
is on disk.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and
# the dependency aliases (DB, Who, Admin) are local to create_app, where only evaluated
# annotations can see them.
import ipaddress
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from posttrain.feedback import assign, auth
from posttrain.feedback.db import (
    Annotator,
    Label,
    LoginSession,
    NameTaken,
    Project,
    open_database,
    open_reader,
)
from posttrain.feedback.export import export_rows, project_agreement, read_labels
from posttrain.feedback.projects import create_project, parse_samples, project_summary

STATIC = Path(__file__).parent / "static"
COOKIE = "posttrain_feedback_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_BODY = 1 << 20
"""Bytes in a request body: a login, a label (its rationale at most 5000 characters), an
annotator. Refused (413) before anything reads it."""
MAX_PROJECT_BODY = 64 << 20
"""Bytes in `POST /api/admin/projects`, a project's rows uploaded from /admin; a larger samples
file goes in with `posttrain feedback create-project --samples`."""
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(Body):
    token: str = ""


class LabelBody(Body):
    ranking: list[int] | None = None
    """Response indices (as the item lists them, `index`), best first."""
    tie: bool = False
    rationale: str = Field("", max_length=assign.MAX_RATIONALE)
    flags: dict[str, list[int]] = {}


class AnnotatorBody(Body):
    name: str
    admin: bool = False


class ProjectBody(Body):
    name: str
    mode: Literal["rank", "pair"] = "rank"
    labels_per_item: int = Field(3, ge=1)
    lease_seconds: float = Field(600.0, gt=0)
    shuffle: bool = True
    rows: list[Any]
    """Sample rows `{prompt, responses, id?}`."""


@dataclass(frozen=True)
class Caller:
    annotator: Annotator
    session: LoginSession | None
    """None when the request authenticated with a bearer token."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _same_origin(request: Request) -> bool:
    """False only for a request whose Origin header names another host: a page elsewhere
    posting here. (Requests from scripts and curl send no Origin.)"""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def create_app(db_url: str) -> FastAPI:
    """The app over the database at `db_url`, its schema upgraded to the newest revision."""
    make_session = open_database(db_url)  # for requests that write (SQLite: BEGIN IMMEDIATE)
    make_reader = open_reader(db_url)  # for those that only read (no lock)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    _install_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def database() -> Iterator[Session]:
        with make_session() as db:
            yield db

    def reading() -> Iterator[Session]:
        with make_reader() as db:
            yield db

    DB = Annotated[Session, Depends(database)]
    Reader = Annotated[Session, Depends(reading)]

    def caller(request: Request) -> Caller:
        with make_reader() as db:
            return authenticate(request, db)

    def authenticate(request: Request, db: Session) -> Caller:
        # Only a Bearer header is ours: one a browser adds by itself (Basic, for a proxy that
        # asks for a password) leaves the request to its session cookie and CSRF token.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            annotator = auth.annotator_for_token(db, token.strip())
            if annotator is None:
                raise HTTPException(401, "the Authorization header holds no valid token")
            return Caller(annotator, None)
        session = auth.session_for_cookie(db, request.cookies.get(COOKIE, ""))
        if session is None:
            raise HTTPException(
                401, "not logged in: POST /api/login with your token, or send a bearer token"
            )
        if request.method not in SAFE_METHODS and not auth.csrf_matches(
            session, request.headers.get("x-csrf-token")
        ):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header (see GET /api/me)")
        return Caller(db.get(Annotator, session.annotator_id), session)  # type: ignore[arg-type]

    Who = Annotated[Caller, Depends(caller)]

    def admin(who: Who) -> Caller:
        if not who.annotator.is_admin:
            raise HTTPException(403, f"{who.annotator.name} is not an admin")
        return who

    Admin = Annotated[Caller, Depends(admin)]

    def project_or_404(db: Session, project_id: int) -> Project:
        project = db.get(Project, project_id)
        if project is None:
            raise HTTPException(404, f"no project {project_id}")
        return project

    def offer_json(db: Session, offer: assign.Offer | None, project: Project, who: Caller) -> dict:
        progress = assign.progress(db, project, who.annotator, with_open=False)
        head = {"id": project.id, "name": project.name, "mode": project.mode}
        if offer is None:
            return {"lease": None, "project": head, "progress": progress}
        texts = offer.item.responses
        return {
            "lease": {"id": offer.lease.id, "expires_at": offer.lease.expires_at},
            "project": head,
            "item": {
                "id": offer.item.id,
                "key": offer.item.key,
                "prompt": offer.item.prompt,
                "responses": [{"index": i, "text": texts[i]} for i in offer.order],
            },
            "progress": progress,
        }

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> FileResponse:
        return FileResponse(STATIC / "admin.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # none, and no 404 in the browser's console

    @app.get("/api/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/api/login")
    def login(
        request: Request,
        response: Response,
        db: DB,
        body: LoginBody | None = None,
    ) -> dict:
        annotator = auth.annotator_for_token(db, body.token if body else "")
        if annotator is None:
            raise HTTPException(401, "missing or unknown token" if body else "missing token")
        session_id, csrf = auth.start_session(db, annotator)
        db.commit()
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=auth.SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return {"name": annotator.name, "admin": annotator.is_admin, "csrf": csrf}

    @app.post("/api/logout")
    def logout(request: Request, response: Response, who: Who, db: DB) -> dict:
        auth.end_session(db, request.cookies.get(COOKIE, ""))
        db.commit()
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/me")
    def me(who: Who) -> dict:
        csrf = who.session.csrf_token if who.session else None
        return {"name": who.annotator.name, "admin": who.annotator.is_admin, "csrf": csrf}

    @app.get("/api/projects")
    def projects(who: Who, db: Reader) -> list[dict]:
        return [
            {
                "id": p.id,
                "name": p.name,
                "mode": p.mode,
                "progress": assign.progress(db, p, who.annotator),
            }
            for p in db.scalars(select(Project).order_by(Project.id))
        ]

    @app.post("/api/projects/{project_id}/lease")
    def lease(project_id: int, who: Who, db: DB) -> dict:
        project = project_or_404(db, project_id)
        offer = assign.lease_next(db, project, who.annotator)
        db.commit()
        with make_reader() as read:  # not under the write lock
            return offer_json(read, offer, project, who)

    @app.get("/api/leases/{lease_id}")
    def show_lease(lease_id: str, who: Who, db: Reader) -> dict:
        offer = assign.find_lease(db, lease_id, who.annotator)
        return offer_json(db, offer, db.get(Project, offer.item.project_id), who)

    @app.post("/api/leases/{lease_id}/label")
    def label(lease_id: str, body: LabelBody, who: Who, db: DB) -> dict:
        stored, new = assign.submit(
            db,
            lease_id,
            who.annotator,
            ranking=body.ranking,
            tie=body.tie,
            rationale=body.rationale,
            flags=body.flags,
        )
        db.commit()  # before the answer: a 200 means the label is on disk
        return {"label_id": stored.id, "stored": new}

    @app.get("/api/admin/annotators")
    def annotators(who: Admin, db: Reader) -> list[dict]:
        counts = dict(
            db.execute(select(Label.annotator_id, func.count()).group_by(Label.annotator_id)).all()
        )
        return [
            {
                "name": a.name,
                "admin": a.is_admin,
                "revoked": a.revoked,
                "labels": counts.get(a.id, 0),
            }
            for a in db.scalars(select(Annotator).order_by(Annotator.id))
        ]

    @app.post("/api/admin/annotators")
    def add_annotator(body: AnnotatorBody, who: Admin, db: DB) -> dict:
        try:
            annotator, token = auth.create_annotator(db, body.name, admin=body.admin)
        except ValueError as err:
            raise HTTPException(409 if isinstance(err, NameTaken) else 422, str(err)) from err
        db.commit()
        return {"name": annotator.name, "admin": annotator.is_admin, "token": token}

    @app.post("/api/admin/annotators/{name}/revoke")
    def revoke(name: str, who: Admin, db: DB) -> dict:
        try:
            auth.revoke(db, name)
        except ValueError as err:
            raise HTTPException(404, str(err)) from err
        db.commit()
        return {"name": name, "revoked": True}

    @app.get("/api/admin/projects")
    def admin_projects(who: Admin, db: Reader) -> list:
        return [project_summary(db, p) for p in db.scalars(select(Project).order_by(Project.id))]

    async def project_body(request: Request, who: Admin) -> ProjectBody:
        # Not a plain body parameter: FastAPI reads those before any dependency runs, so anyone
        # could make the server take in and parse MAX_PROJECT_BODY bytes. Here `who` is an admin
        # first; until then the client's upload waits in its socket.
        try:
            return ProjectBody.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from err

    @app.post("/api/admin/projects")
    def add_project(body: Annotated[ProjectBody, Depends(project_body)], db: DB) -> dict:
        try:
            records = parse_samples(body.rows, "rows")
            project = create_project(
                db,
                body.name,
                records,
                mode=body.mode,
                labels_per_item=body.labels_per_item,
                lease_seconds=body.lease_seconds,
                shuffle=body.shuffle,
                source="rows",
            )
        except ValueError as err:  # DataError is one: it names the row and field
            raise HTTPException(409 if isinstance(err, NameTaken) else 422, str(err)) from err
        db.commit()
        return project_summary(db, project)

    @app.get("/api/admin/projects/{project_id}/stats")
    def stats(project_id: int, who: Admin, db: Reader) -> dict:
        project = project_or_404(db, project_id)
        return {**project_summary(db, project), "agreement": project_agreement(db, project)}

    @app.get("/api/admin/projects/{project_id}/export/{name}.jsonl")
    def export(project_id: int, name: str, who: Admin, db: Reader) -> Response:
        if name not in ("rankings", "pairs"):
            raise HTTPException(404, f"no export {name!r}: rankings.jsonl or pairs.jsonl")
        project = project_or_404(db, project_id)
        rankings, pairs, _ = export_rows(read_labels(db, project))
        rows = rankings if name == "rankings" else pairs
        return Response(
            "".join(json.dumps(row) + "\n" for row in rows),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{name}.jsonl"'},
        )

    return app


class SecurityMiddleware:
    """Refuses cross-origin, non-JSON and oversized state-changing requests before any handler
    reads them, and adds `SECURITY_HEADERS` to every answer (plain ASGI: no task per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        request = Request(scope)
        refusal = None
        if request.method not in SAFE_METHODS:
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            length = request.headers.get("content-length")
            limit, hint = MAX_BODY, ""
            if request.url.path == "/api/admin/projects":
                limit, hint = MAX_PROJECT_BODY, " (more: posttrain feedback create-project)"
            if not _same_origin(request):
                refusal = _error(403, "cross-origin request refused")
            elif request.url.path.startswith("/api/") and kind not in ("application/json", ""):
                # A cross-site HTML form can post only form encodings and text/plain.
                refusal = _error(415, "send JSON (Content-Type: application/json)")
            elif length is None and "transfer-encoding" in request.headers:
                # Chunked: no size up front. (The server checks a stated length against the body.)
                refusal = _error(411, "send the body with a Content-Length header")
            elif length is not None and (not length.isdigit() or int(length) > limit):
                refusal = _error(413, f"request body of {length} bytes; at most {limit}{hint}")
        await (refusal or self.app)(scope, receive, send_with_headers)


def _install_handlers(app: FastAPI) -> None:
    """Security headers on every answer; every refusal as `{"error": message}`."""
    app.add_middleware(SecurityMiddleware)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(assign.LeaseError)
    async def lease_error(request: Request, err: assign.LeaseError) -> JSONResponse:
        return _error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in err.errors()
        ]
        return _error(422, "; ".join(problems))


def serve(db_url: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Upgrade the schema, then serve until interrupted; prints the URL first."""
    import uvicorn

    app = create_app(db_url)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"posttrain feedback: http://{shown}:{bound}/ (admin: /admin; database {db_url})")
    if not _is_loopback(host):
        print(
            "warning: listening beyond this machine over plain HTTP; put a TLS proxy in front "
            "(login tokens and session cookies would otherwise cross the network in clear)"
        )
    print("press Ctrl+C to stop", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
