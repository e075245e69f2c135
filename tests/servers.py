"""What the HTTP and browser tests share: an ASGI app served on a free loopback port, and the
headless Chromium (Debian's `chromium`, driven by playwright) the page tests open."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chromium() -> str:
    """The Chromium executable; without one (or without playwright) the test fails, or skips
    under POSTTRAIN_ALLOW_NO_BROWSER=1."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if path:
        return path
    why = "a headless Chromium with playwright (apt-get install chromium; pip install playwright)"
    if os.environ.get("POSTTRAIN_ALLOW_NO_BROWSER") == "1":
        pytest.skip(f"no browser (POSTTRAIN_ALLOW_NO_BROWSER=1): {why}")
    pytest.fail(f"this test needs {why}\n(set POSTTRAIN_ALLOW_NO_BROWSER=1 to skip instead)")
