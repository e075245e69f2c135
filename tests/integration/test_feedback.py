"""`posttrain feedback` over real HTTP on loopback, against a real SQLite file: logins, CSRF,
cross-annotator access and admin-only actions refused; the security headers; N annotators per
item and never one twice; leases expiring; 20 annotators x 50 submissions at once; a server
SIGKILLed mid-load; a headless Chromium labelling by clicks and keys, an XSS payload shown as
text, and the export holding exactly those labels; exported labels training `posttrain rm` and
`posttrain dpo`.

The browser: Debian's `chromium` driven by `playwright`. Without it these tests fail; set
POSTTRAIN_ALLOW_NO_BROWSER=1 to skip them instead where that is known and accepted."""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posttrain.feedback.app import (
    CONTENT_SECURITY_POLICY,
    COOKIE,
    MAX_BODY,
    MAX_PROJECT_BODY,
    create_app,
)
from tests.servers import chromium, serve_in_thread

pytestmark = pytest.mark.integration
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
XSS_RESPONSE = '<img src=x onerror="window.__xss=1">'
XSS_SCRIPT = "<script>window.__xss=2</script>"
XSS_PROMPT = "Rate these <script>window.__xss=3</script> answers"
UPLOADED = 'uploaded <img src=x onerror="window.__xss=4">'  # a project name on /admin


def cli(*args: str) -> str:
    """stdout of `posttrain ARGS`, run in this process by the command's own `main`."""
    from posttrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def admin_token(db_url: str) -> str:
    return cli("feedback", "admin-token", "--db", db_url).strip().splitlines()[-1]


class Client:
    """One user agent over urllib: a bearer token, or a session cookie plus its CSRF token."""

    def __init__(self, base: str, bearer: str | None = None) -> None:
        self.base, self.bearer = base, bearer
        self.cookie: str | None = None
        self.csrf: str | None = None

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60, **headers: str
    ) -> tuple[int, Any, Any]:
        """(status, JSON body or text, headers); never raises for an HTTP error status."""
        sent = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        if self.bearer:
            sent["Authorization"] = f"Bearer {self.bearer}"
        if self.cookie:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        if self.csrf and method != "GET":
            sent["X-CSRF-Token"] = self.csrf
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, got = response.status, response.read(), response.headers
        except urllib.error.HTTPError as err:
            status, raw, got = err.code, err.read(), err.headers
        for cookie in got.get_all("Set-Cookie") or []:
            name, _, rest = cookie.partition("=")
            if name == COOKIE:
                self.cookie = rest.split(";")[0] or None
        try:
            return status, json.loads(raw), got
        except ValueError:
            return status, raw.decode(), got

    def login(self, token: str) -> int:
        status, body, _ = self.call("POST", "/api/login", {"token": token})
        if status == 200:
            self.csrf = body["csrf"]
        return status


def raw_post(base: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """(status, JSON body) of a POST written by hand on a socket: the headers (which may promise
    more body than `body`, or a chunked one), then `body`; the answer must come within 10 s."""
    host, port = base.removeprefix("http://").split(":")
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def thread_server(db_url: str):
    """The app on a free loopback port, uvicorn in a background thread."""
    return serve_in_thread(create_app(db_url))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server(db_url: str, port: int) -> subprocess.Popen:
    """`posttrain feedback serve` as its own process, once it answers."""
    cmd = [sys.executable, "-m", "posttrain.cli", "feedback", "serve", "--db", db_url]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return proc
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def samples(n: int, k: int, prefix: str = "q") -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "prompt": f"prompt {i}", "responses": [f"{i}.{j}" for j in range(k)]}
        for i in range(n)
    ]


def make_annotators(admin: Client, names: list[str]) -> dict[str, str]:
    tokens = {}
    for name in names:
        status, body, _ = admin.call("POST", "/api/admin/annotators", {"name": name})
        assert status == 200, body
        tokens[name] = body["token"]
    return tokens


def make_project(admin: Client, name: str, rows: list[dict], **options: Any) -> int:
    status, body, _ = admin.call(
        "POST", "/api/admin/projects", {"name": name, "rows": rows, **options}
    )
    assert status == 200, body
    return body["id"]


def query(db_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        return connection.execute(sql).fetchall()


# ---- the API on a server in this process


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    """A server on a fresh database: an admin, alice and bob, a project of 3 items."""
    db_path = tmp_path_factory.mktemp("feedback") / "feedback.db"
    url = f"sqlite:///{db_path}"
    token = admin_token(url)
    with thread_server(url) as base:
        admin = Client(base, bearer=token)
        tokens = make_annotators(admin, ["alice", "bob"])
        rows = samples(2, 3) + [
            {"id": "xss", "prompt": XSS_PROMPT, "responses": [XSS_RESPONSE, XSS_SCRIPT, "plain"]}
        ]
        project = make_project(admin, "api", rows, labels_per_item=2)
        yield {
            "base": base,
            "db": db_path,
            "url": url,
            "admin": token,
            "project": project,
            **tokens,
        }


def test_login_refuses_missing_and_wrong_tokens(site):
    anonymous = Client(site["base"])
    assert anonymous.call("POST", "/api/login", {})[0] == 401
    assert anonymous.call("POST", "/api/login")[0] == 401
    status, body, _ = anonymous.call("POST", "/api/login", {"token": "not-a-token"})
    assert (status, body) == (401, {"error": "missing or unknown token"})
    assert anonymous.login(site["alice"][:-2]) == 401
    assert anonymous.call("GET", "/api/projects")[0] == 401
    assert anonymous.call("POST", f"/api/projects/{site['project']}/lease")[0] == 401
    assert Client(site["base"], bearer="wrong").call("GET", "/api/projects")[0] == 401
    forged = Client(site["base"])
    forged.cookie = "forged-session"
    assert forged.call("GET", "/api/me")[0] == 401
    alice = Client(site["base"])
    assert alice.login(site["alice"]) == 200
    assert alice.cookie and alice.call("GET", "/api/me")[1]["name"] == "alice"
    # a form post (what a page elsewhere could send) is refused before it is read
    status, _, _ = alice.call(
        "POST", "/api/login", None, Content_Type="application/x-www-form-urlencoded"
    )
    assert status == 415


def test_state_changing_requests_need_the_sessions_csrf_token(site):
    alice = Client(site["base"])
    assert alice.login(site["alice"]) == 200
    right = alice.csrf
    lease = f"/api/projects/{site['project']}/lease"
    alice.csrf = None
    status, body, _ = alice.call("POST", lease)
    assert status == 403 and "X-CSRF-Token" in body["error"]
    alice.csrf = "wrong" + right
    assert alice.call("POST", lease)[0] == 403
    other = Client(site["base"])
    other.login(site["bob"])
    alice.csrf = other.csrf  # bob's session's token does not fit alice's session
    assert alice.call("POST", lease)[0] == 403
    alice.csrf = right
    assert alice.call("POST", lease, Origin="http://evil.example")[0] == 403
    status, offer, _ = alice.call("POST", lease)
    assert status == 200 and offer["lease"]["id"]
    ranking = [r["index"] for r in offer["item"]["responses"]]
    alice.csrf = None
    label = f"/api/leases/{offer['lease']['id']}/label"
    assert alice.call("POST", label, {"ranking": ranking})[0] == 403
    assert alice.call("POST", "/api/logout")[0] == 403
    # a Basic header a browser adds for a password-asking proxy is not a token: the request
    # stands on its cookie, and still needs the CSRF token
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert alice.call("GET", "/api/me", **basic)[1]["name"] == "alice"
    assert alice.call("POST", label, {"ranking": ranking}, **basic)[0] == 403
    alice.csrf = right
    assert alice.call("POST", label, {"ranking": ranking}, **basic)[0] == 200
    assert alice.call("POST", "/api/logout")[0] == 200
    assert alice.call("GET", "/api/me")[0] == 401  # the session is gone
    login = {"token": site["alice"]}
    assert alice.call("POST", "/api/login", login, Origin="http://evil.example")[0] == 403


def test_admin_routes_need_the_csrf_token_too(site):
    admin = Client(site["base"])
    assert admin.login(site["admin"]) == 200
    right = admin.csrf
    for path, body in [
        ("/api/admin/annotators", {"name": "csrf-victim"}),
        ("/api/admin/projects", {"name": "csrf-victim", "rows": samples(1, 2)}),
        ("/api/admin/annotators/bob/revoke", None),
    ]:
        for csrf in (None, "wrong"):
            admin.csrf = csrf
            status, answer, _ = admin.call("POST", path, body)
            assert status == 403 and "X-CSRF-Token" in answer["error"], path
    admin.csrf = right
    assert admin.call("POST", "/api/admin/annotators", {"name": "csrf-ok"})[0] == 200
    assert query(site["db"], "select name from annotators where name like 'csrf%'") == [
        ("csrf-ok",)
    ]
    assert query(site["db"], "select count(*) from projects where name = 'csrf-victim'") == [(0,)]
    assert query(site["db"], "select revoked from annotators where name = 'bob'") == [(0,)]


def test_taken_names_get_409_and_malformed_ones_422(site):
    admin = Client(site["base"], bearer=site["admin"])
    # the word "exists" in a malformed name does not make it a taken one
    for name, status in [("alice", 409), ("exists!", 422), ("has exists already", 422)]:
        answer = admin.call("POST", "/api/admin/annotators", {"name": name})
        assert answer[0] == status, (name, answer[1])
    long_name = "this project exists already " * 4  # over 100 characters
    for name, status in [("api", 409), (long_name, 422)]:
        body = {"name": name, "rows": samples(1, 2)}
        assert admin.call("POST", "/api/admin/projects", body)[0] == status, name
    assert admin.call("POST", "/api/admin/projects", {"rows": []})[1] == {
        "error": "name: Field required"
    }


def test_oversized_and_unsized_bodies_are_refused_before_they_are_read(site):
    """Only headers are sent: a refusal must come without the promised body."""
    json_type = {"Content-Type": "application/json"}
    status, answer = raw_post(
        site["base"], "/api/login", {**json_type, "Content-Length": str(MAX_BODY + 1)}
    )
    assert status == 413 and f"at most {MAX_BODY}" in answer["error"]
    chunked = {**json_type, "Transfer-Encoding": "chunked"}
    assert raw_post(site["base"], "/api/login", chunked, b"2\r\n{}\r\n0\r\n\r\n")[0] == 411
    projects, admin = "/api/admin/projects", {"Authorization": f"Bearer {site['admin']}"}
    too_big = {**json_type, **admin, "Content-Length": str(MAX_PROJECT_BODY + 1)}
    assert raw_post(site["base"], projects, too_big)[0] == 413
    # a project's upload may be large, so it is read only for an admin: anyone else is refused
    # at once (it used to wait for all 10 MB, then parse them, then refuse)
    anonymous = {**json_type, "Content-Length": str(10_000_000)}
    assert raw_post(site["base"], projects, anonymous) == (
        401,
        {"error": "not logged in: POST /api/login with your token, or send a bearer token"},
    )
    bob = {**anonymous, "Authorization": f"Bearer {site['bob']}"}
    assert raw_post(site["base"], projects, bob) == (403, {"error": "bob is not an admin"})


def test_annotators_cannot_use_each_others_leases_or_admin_actions(site):
    alice, bob = Client(site["base"]), Client(site["base"])
    alice.login(site["alice"])
    bob.login(site["bob"])
    _, offer, _ = alice.call("POST", f"/api/projects/{site['project']}/lease")
    lease = offer["lease"]["id"]
    ranking = [r["index"] for r in offer["item"]["responses"]]
    status, body, _ = bob.call("GET", f"/api/leases/{lease}")
    assert status == 403 and "another annotator" in body["error"]
    assert bob.call("POST", f"/api/leases/{lease}/label", {"ranking": ranking})[0] == 403
    assert alice.call("GET", f"/api/leases/{lease}")[1]["item"] == offer["item"]
    for method, path, body in [
        ("GET", "/api/admin/annotators", None),
        ("POST", "/api/admin/annotators", {"name": "mallory", "admin": True}),
        ("POST", "/api/admin/projects", {"name": "x", "rows": samples(1, 2)}),
        ("GET", f"/api/admin/projects/{site['project']}/export/rankings.jsonl", None),
        ("GET", f"/api/admin/projects/{site['project']}/stats", None),
        ("POST", "/api/admin/annotators/alice/revoke", None),
    ]:
        status, answer, _ = bob.call(method, path, body)
        assert (status, answer) == (403, {"error": "bob is not an admin"}), path
    # bob's refused submission left alice's lease intact: she submits
    assert alice.call("POST", f"/api/leases/{lease}/label", {"ranking": ranking})[0] == 200
    assert query(site["db"], "select count(*) from annotators where name = 'mallory'") == [(0,)]


def test_pages_and_answers_carry_the_security_headers(site):
    alice = Client(site["base"])
    status, _, headers = alice.call("POST", "/api/login", {"token": site["alice"]})
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    for path in ("/", "/admin", "/static/app.js", "/static/style.css", "/api/me", "/nope"):
        _, page, headers = alice.call("GET", path)
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ):
        assert directive in CONTENT_SECURITY_POLICY
    _, page, _ = alice.call("GET", "/")
    assert '<meta name="viewport"' in page and "<script>" not in page and "style=" not in page


def test_model_text_is_stored_and_returned_as_plain_text(site):
    admin = Client(site["base"], bearer=site["admin"])
    status, rows, headers = admin.call(
        "GET", f"/api/admin/projects/{site['project']}/export/rankings.jsonl"
    )
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    stored = query(site["db"], "select prompt_json, responses_json from items where key = 'xss'")
    assert json.loads(stored[0][0]) == XSS_PROMPT
    assert json.loads(stored[0][1]) == [XSS_RESPONSE, XSS_SCRIPT, "plain"]
    bob = Client(site["base"], bearer=site["bob"])
    for _ in range(3):  # bob reaches the xss item within the project's 3 items
        _, offer, _ = bob.call("POST", f"/api/projects/{site['project']}/lease")
        if offer["item"]["key"] == "xss":
            break
        ranking = [r["index"] for r in offer["item"]["responses"]]
        bob.call("POST", f"/api/leases/{offer['lease']['id']}/label", {"ranking": ranking})
    assert offer["item"]["prompt"] == XSS_PROMPT
    assert {r["text"] for r in offer["item"]["responses"]} == {XSS_RESPONSE, XSS_SCRIPT, "plain"}


def test_each_item_gets_n_different_annotators_over_http(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    token = admin_token(url)
    with thread_server(url) as base:
        admin = Client(base, bearer=token)
        people = make_annotators(admin, [f"a{i}" for i in range(4)])
        project = make_project(admin, "n", samples(5, 2), labels_per_item=2)
        seen: dict[str, list[str]] = {name: [] for name in people}
        for name in itertools.islice(itertools.cycle(people), 40):
            client = Client(base, bearer=people[name])
            _, offer, _ = client.call("POST", f"/api/projects/{project}/lease")
            if offer["lease"] is None:
                continue
            seen[name].append(offer["item"]["key"])
            path = f"/api/leases/{offer['lease']['id']}/label"
            assert client.call("POST", path, {"ranking": [1, 0]})[1]["stored"] is True
            # the same submission again (a retry after a lost answer) adds nothing
            assert client.call("POST", path, {"ranking": [1, 0]})[1]["stored"] is False
        for name, keys in seen.items():
            assert len(keys) == len(set(keys)), f"{name} labelled an item twice: {keys}"
        counts = query(tmp_path / "n.db", "select item_id, count(*) from labels group by item_id")
        assert sorted(n for _, n in counts) == [2] * 5
        _, projects, _ = Client(base, bearer=people["a0"]).call("GET", "/api/projects")
        assert projects[0]["progress"]["open"] == 0


def test_an_expired_lease_returns_its_item_to_the_pool_over_http(tmp_path):
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    token = admin_token(url)
    with thread_server(url) as base:
        admin = Client(base, bearer=token)
        people = make_annotators(admin, ["slow", "fast"])
        project = make_project(admin, "lease", samples(1, 2), labels_per_item=1, lease_seconds=0.5)
        slow, fast = Client(base, bearer=people["slow"]), Client(base, bearer=people["fast"])
        _, held, _ = slow.call("POST", f"/api/projects/{project}/lease")
        _, blocked, _ = fast.call("POST", f"/api/projects/{project}/lease")
        assert blocked["lease"] is None  # the only slot is leased
        time.sleep(0.7)  # slow closed the tab: the lease runs out
        _, taken, _ = fast.call("POST", f"/api/projects/{project}/lease")
        assert taken["item"]["id"] == held["item"]["id"]
        status, body, _ = slow.call(
            "POST", f"/api/leases/{held['lease']['id']}/label", {"ranking": [0, 1]}
        )
        assert status == 409 and "gone" in body["error"]
        assert (
            fast.call("POST", f"/api/leases/{taken['lease']['id']}/label", {"ranking": [0, 1]})[0]
            == 200
        )
        assert query(tmp_path / "lease.db", "select count(*) from labels") == [(1,)]


# ---- load and crashes, against `posttrain feedback serve` in its own process


class Load:
    """What a crowd of `label_worker`s saw."""

    def __init__(self, workers: int) -> None:
        self.acked: list[str] = []  # lease ids whose label got a 200
        self.lost: list[tuple[str, str, dict]] = []  # label requests cut off: (token, path, body)
        self.refused: list[Any] = []  # any answer but a 200 with a lease or a stored label
        self.start = threading.Barrier(workers)


def label_worker(base: str, token: str, project: int, submissions: int, load: Load) -> None:
    """Lease and label `submissions` items in a random order, until the server goes away."""
    client, rng = Client(base, bearer=token), random.Random(token)
    load.start.wait()
    for _ in range(submissions):
        try:
            status, offer, _ = client.call("POST", f"/api/projects/{project}/lease", timeout=30)
        except (OSError, http.client.HTTPException):
            return
        if status != 200 or not offer["lease"]:
            load.refused.append((status, offer))
            return
        ranking = [r["index"] for r in offer["item"]["responses"]]
        rng.shuffle(ranking)
        body = {"ranking": ranking}
        path = f"/api/leases/{offer['lease']['id']}/label"
        try:
            status, answer, _ = client.call("POST", path, body, timeout=30)
        except (OSError, http.client.HTTPException):
            load.lost.append((token, path, body))
            return
        if status != 200 or not answer["stored"]:
            load.refused.append((status, answer))
            return
        load.acked.append(offer["lease"]["id"])


def test_twenty_annotators_fifty_submissions_each_lose_and_duplicate_nothing(tmp_path):
    db_path = tmp_path / "load.db"
    url = f"sqlite:///{db_path}"
    token, port = admin_token(url), free_port()
    proc = start_process_server(url, port)
    try:
        base = f"http://127.0.0.1:{port}"
        admin = Client(base, bearer=token)
        people = make_annotators(admin, [f"load{i}" for i in range(20)])
        project = make_project(admin, "load", samples(400, 3), labels_per_item=3)
        load = Load(20)
        threads = [
            threading.Thread(target=label_worker, args=(base, t, project, 50, load))
            for t in people.values()
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        seconds = time.monotonic() - began
    finally:
        stop(proc)
    labels = query(
        db_path, "select count(*), count(distinct item_id || '/' || annotator_id) from labels"
    )
    fullest = query(db_path, "select max(n) from (select count(*) n from labels group by item_id)")
    per_person = query(db_path, "select count(*) from labels group by annotator_id")
    stored = {row[0] for row in query(db_path, "select lease_id from labels")}
    print(
        f"\nconcurrency: 20 annotators x 50 submissions in {seconds:.1f} s: {len(load.acked)} "
        f"acknowledged, {labels[0][0]} labels stored, {labels[0][1]} distinct (item, annotator), "
        f"most labels on one item {fullest[0][0]} (N=3), "
        f"{len(load.refused) + len(load.lost)} errors"
    )
    assert not load.refused and not load.lost and len(load.acked) == 1000
    assert labels == [(1000, 1000)]
    assert fullest[0][0] <= 3
    assert per_person == [(50,)] * 20
    assert stored == set(load.acked)
    assert query(db_path, "select count(*) from leases") == [(0,)]


def test_killing_the_server_mid_load_loses_no_acknowledged_label(tmp_path):
    db_path = tmp_path / "kill.db"
    url = f"sqlite:///{db_path}"
    token, port = admin_token(url), free_port()
    proc = start_process_server(url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        admin = Client(base, bearer=token)
        people = make_annotators(admin, [f"kill{i}" for i in range(10)])
        project = make_project(admin, "kill", samples(200, 2), labels_per_item=3)
        load = Load(10)
        threads = [
            threading.Thread(target=label_worker, args=(base, t, project, 60, load))
            for t in people.values()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(load.acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-load: no shutdown, no cleanup
        proc.wait()
        acked_at_kill = len(load.acked)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        stop(proc)
    assert 150 <= acked_at_kill < 600, "the kill should land while labels are still coming in"
    assert not load.refused, load.refused
    acked, lost = load.acked, load.lost
    on_disk = {row[0] for row in query(db_path, "select lease_id from labels")}
    missing = set(acked) - on_disk
    committed_unacked = len(on_disk) - len(set(acked) & on_disk)

    proc = start_process_server(url, port)  # the same database, restarted
    try:
        assert query(db_path, "pragma integrity_check") == [("ok",)]
        retried = {"stored now": 0, "already stored": 0}
        for bearer, path, body in lost:  # the annotators whose answers never came press again
            status, answer, _ = Client(base, bearer=bearer).call("POST", path, body)
            assert status == 200, answer
            retried["stored now" if answer["stored"] else "already stored"] += 1
    finally:
        stop(proc)
    total, distinct = query(
        db_path, "select count(*), count(distinct item_id || '/' || annotator_id) from labels"
    )[0]
    print(
        f"\nkill mid-load: {len(acked)} acknowledged before SIGKILL, {len(missing)} of them "
        f"missing after restart; {len(lost)} label requests in flight at the kill "
        f"({committed_unacked} committed without their answer); retried after restart: "
        f"{retried}; labels in the database: {total}, distinct (item, annotator): {distinct}"
    )
    assert not missing
    assert retried["already stored"] == committed_unacked
    assert total == distinct == len(acked) + len(lost)


# ---- a real browser


def test_a_browser_labels_by_clicks_and_keys_and_the_export_holds_exactly_that(tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    db_path = tmp_path / "browser.db"
    url = f"sqlite:///{db_path}"
    token = admin_token(url)
    rank_rows = [
        {
            "id": "sky",
            "prompt": "What colour is the sky?",
            "responses": ["blue", "green", "It is blue."],
        },
        {"id": "sum", "prompt": "2+2?", "responses": ["4", "5", "22"]},
        {"id": "xss", "prompt": XSS_PROMPT, "responses": [XSS_RESPONSE, XSS_SCRIPT, "plain"]},
    ]
    pair_rows = [
        {"id": "p1", "prompt": "Say hi", "responses": ["hi", "go away"]},
        {"id": "p2", "prompt": "Say bye", "responses": ["bye", "ciao"]},
    ]
    with thread_server(url) as base:
        admin = Client(base, bearer=token)
        people = make_annotators(admin, ["desk", "phone"])
        make_project(admin, "rank", rank_rows, labels_per_item=2)
        make_project(admin, "pair", pair_rows, mode="pair", labels_per_item=1)
        # the order each item is ranked in, best first: reverse alphabetical by text
        wanted = {row["id"]: sorted(row["responses"], reverse=True) for row in rank_rows}
        keys = {row["prompt"]: row["id"] for row in rank_rows + pair_rows}
        done: list[tuple[str, str]] = []

        with sync_playwright() as p:
            args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            args += ["--disable-component-update", "--disable-sync", "--no-first-run"]
            browser = p.chromium.launch(executable_path=executable, args=args)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(base + "/")
            page.fill("#token", "wrong-token")
            page.click("#login-form button")
            page.wait_for_selector("#login-error:has-text('Unknown token.')")
            page.fill("#token", people["desk"])
            page.click("#login-form button")
            page.click("li.project:has-text('rank') button")

            def shown() -> tuple[str, list[str]]:
                page.wait_for_selector("#responses .response")
                prompt = page.inner_text("#prompt").strip()
                return keys[prompt], page.locator("#responses .text").all_inner_texts()

            def next_item(previous: str) -> None:
                page.wait_for_function(
                    "p => document.getElementById('prompt').innerText.trim() !== p"
                    " || !document.getElementById('done').hidden",
                    arg=previous,
                )

            for way in ("click", "keys", "click"):
                key, texts = shown()
                before = page.inner_text("#prompt").strip()
                positions = [texts.index(text) for text in wanted[key]]
                if key == "xss":  # the payload is on the page as text, and did nothing
                    assert XSS_RESPONSE in texts and XSS_SCRIPT in texts
                    assert page.inner_text("#prompt").strip() == XSS_PROMPT
                    assert page.locator("#responses img, #prompt img").count() == 0
                    assert page.locator("script").count() == 1  # app.js only
                    assert page.evaluate("window.__xss") is None
                    cards = page.locator("#responses .response")
                    cards.nth(texts.index(XSS_RESPONSE)).locator("button[data-flag=unsafe]").click()
                    page.fill("#rationale", "plain text is best")
                if way == "click":
                    cards = page.locator("#responses .response")
                    for position in positions[:-1]:  # the last ranks itself
                        cards.nth(position).locator(".text").click()
                    page.click("#submit")
                else:
                    for position in positions:
                        page.keyboard.press(str(position + 1))
                    page.keyboard.press("Backspace")  # take the last pick back ...
                    page.keyboard.press(str(positions[-1] + 1))  # ... and make it again
                    page.keyboard.press("Enter")
                done.append((key, "desk"))
                next_item(before)
            assert page.is_visible("#done")
            assert page.evaluate("window.__xss") is None

            # pairs: b then Enter on the first; a click on Tie and on Submit on the second
            page.click("#back")
            page.click("li.project:has-text('pair') button")
            key, texts = shown()
            assert key == "p1"
            page.keyboard.press("b")
            page.keyboard.press("Enter")
            pair_choice = {"p1": (texts[1], texts[0])}
            next_item("Say hi")
            key, texts = shown()
            assert key == "p2"
            page.click("#pair-choices button[data-choice=tie]")
            page.click("#submit")
            page.wait_for_selector("#done:not([hidden])")

            # a phone: one column, nothing wider than the screen, ranked by taps
            phone = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
            ).new_page()
            phone.goto(base + "/")
            phone.fill("#token", people["phone"])
            phone.tap("#login-form button")
            phone.tap("li.project:has-text('rank') button")
            phone.wait_for_selector("#responses .response")
            before = phone.inner_text("#prompt").strip()
            key = keys[before]
            texts = phone.locator("#responses .text").all_inner_texts()
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            boxes = [phone.locator("#responses .response").nth(i).bounding_box() for i in range(3)]
            assert len({round(b["x"]) for b in boxes}) == 1  # stacked, not side by side
            for text in wanted[key][:-1]:
                phone.locator("#responses .response .text").nth(texts.index(text)).tap()
            phone.tap("#submit")
            phone.wait_for_function(
                "p => document.getElementById('prompt').innerText.trim() !== p", arg=before
            )
            done.append((key, "phone"))

            # the admin page shows the project's labels
            admin_page = browser.new_page()
            admin_page.goto(base + "/admin")
            admin_page.fill("#token", token)
            admin_page.click("#login-form button")
            row = admin_page.locator("#project-table tr:has-text('rank')").first
            row.wait_for()
            assert row.locator("td").nth(4).inner_text() == "4"
            # ... and makes a project from an uploaded samples file, and an annotator's token
            upload = tmp_path / "upload.jsonl"
            upload.write_text("".join(json.dumps(r) + "\n" for r in samples(3, 2, "u")))
            admin_page.fill("#project-name-input", UPLOADED)
            admin_page.set_input_files("#project-file", str(upload))
            admin_page.click("#project-form button")
            uploaded = admin_page.locator("#project-table tr:has-text('uploaded')")
            uploaded.wait_for()
            assert uploaded.locator("td").first.inner_text() == UPLOADED  # as text, inert
            assert admin_page.locator("#project-table img").count() == 0
            assert admin_page.evaluate("window.__xss") is None
            admin_page.fill("#annotator-name", "newcomer")
            admin_page.click("#annotator-form button")
            admin_page.wait_for_selector("#new-token:not([hidden])")
            new_token = admin_page.inner_text("#new-token-value")
            browser.close()
        assert not problems, problems
        newcomer = Client(base)
        assert newcomer.login(new_token) == 200
        _, projects, _ = newcomer.call("GET", "/api/projects")
        assert [(p["name"], p["progress"]["items"]) for p in projects][-1] == (UPLOADED, 3)

        out = tmp_path / "export"
        cli("feedback", "export", "rank", "--out", str(out), "--db", url)
        rankings = [json.loads(line) for line in (out / "rankings.jsonl").open()]
        assert sorted((r["item"], r["annotator"]) for r in rankings) == sorted(done)
        for row in rankings:
            assert row["responses"] == wanted[row["item"]], row
        xss = next(r for r in rankings if r["item"] == "xss")
        assert xss["rationale"] == "plain text is best"
        assert xss["flags"][xss["responses"].index(XSS_RESPONSE)] == ["unsafe"]
        assert sum(r["flags"] != [[]] * 3 for r in rankings) == 1

        cli("feedback", "export", "pair", "--out", str(tmp_path / "pairs"), "--db", url)
        pairs = [json.loads(line) for line in (tmp_path / "pairs/pairs.jsonl").open()]
        assert [(p["item"], p["chosen"], p["rejected"]) for p in pairs] == [
            ("p1", *pair_choice["p1"])
        ]  # the tie on p2 is no preference
        summary = json.loads((tmp_path / "pairs/summary.json").read_text())
        assert (summary["labels"], summary["ties_left_out"]) == (2, 1)


# ---- the loop: sampled by a model, labelled in the app, trained on by `posttrain rm` and dpo


def test_labels_exported_from_the_app_train_rm_and_dpo(tiny_qwen2, tmp_path):
    db_path = tmp_path / "loop.db"
    url = f"sqlite:///{db_path}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}"}) + "\n" for i in range(24))
    )
    made = json.loads(
        cli(
            "feedback",
            "create-project",
            "loop",
            "--model",
            str(tiny_qwen2),
            "--prompts",
            str(prompts),
            "--k",
            "3",
            "--max-new-tokens",
            "8",
            "--labels-per-item",
            "2",
            "--db",
            url,
        )
    )
    assert made["items"] + made.get("prompts_skipped", 0) == 24 and made["items"] >= 20
    token = admin_token(url)
    with thread_server(url) as base:
        admin = Client(base, bearer=token)
        people = make_annotators(admin, ["ann1", "ann2"])
        for name in people:
            client = Client(base, bearer=people[name])
            while True:
                _, offer, _ = client.call("POST", f"/api/projects/{made['id']}/lease")
                if offer["lease"] is None:
                    break
                # the rule: more letters 'a' first, then shorter first
                shown = sorted(
                    offer["item"]["responses"],
                    key=lambda r: (-r["text"].count("a"), len(r["text"]), r["text"]),
                )
                ranking = [r["index"] for r in shown]
                path = f"/api/leases/{offer['lease']['id']}/label"
                assert client.call("POST", path, {"ranking": ranking})[0] == 200
    out = tmp_path / "labels"
    summary = json.loads(cli("feedback", "export", "loop", "--out", str(out), "--db", url))
    assert summary["rankings"] == 2 * made["items"]
    stats = json.loads(cli("feedback", "stats", "loop", "--db", url))
    assert stats["agreement"]["pairwise_agreement"] == pytest.approx(1.0)  # one rule, two people
    assert stats["agreement"]["alpha"] == pytest.approx(1.0)

    rm_out = tmp_path / "rm"
    cli(
        "rm",
        f"model.path={tiny_qwen2}",
        f"data.train={out / 'rankings.jsonl'}",
        f"run.out_dir={rm_out}",
        "run.max_steps=3",
        "run.eval_every=3",
        "run.progress=false",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "data.eval_fraction=0.1",
    )
    trained = json.loads((rm_out / "summary.json").read_text())
    assert trained["train_comparisons"] + trained["eval_comparisons"] == summary["rankings"]
    assert (rm_out / "final" / "config.json").exists()

    dpo_out = tmp_path / "dpo"
    cli(
        "dpo",
        f"model.path={tiny_qwen2}",
        f"data.train={out / 'pairs.jsonl'}",
        f"run.out_dir={dpo_out}",
        f"reference.cache_dir={tmp_path / 'reference'}",
        "run.max_steps=2",
        "run.progress=false",
        "train.batch_size=8",
        "train.micro_batch_size=8",
    )
    trained = json.loads((dpo_out / "summary.json").read_text())
    assert trained["train_pairs"] + trained["eval_pairs"] == summary["pairs"]
    assert (dpo_out / "final" / "config.json").exists()
