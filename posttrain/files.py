"""Files written whole or not at all: a reader sees the old file or the whole new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace the file `path` with what `write(f)` writes to a binary file: a
    concurrent reader sees the old file or the whole new one, and a killed write leaves only a
    `.tmp-*` file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, value: Any) -> Path:
    """`value` as indented JSON, written with `write_atomic`."""
    return write_atomic(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line, written with `write_atomic`."""
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return write_atomic(path, lambda f: f.write(data))
