"""Where the stack that ``imgembed up`` started listens, kept in its data folder while it runs, so
that other commands on this host (status, migrate, psql...) find it without DATABASE_URL."""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORD = "running-stack.json"


def write_record(data_dir: Path, database_url: str, redis_url: str) -> Path:
    """Record the running stack (readable by its owner only: later it may hold passwords)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RECORD
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump({"pid": os.getpid(), "database_url": database_url, "redis_url": redis_url}, handle)
    return path


def clear_record(data_dir: Path) -> None:
    (data_dir / RECORD).unlink(missing_ok=True)


def running_stack(data_dir: Path) -> tuple[str, str] | None:
    """(DATABASE_URL, REDIS_URL) of the stack `imgembed up` runs from this data folder, if it does."""
    try:
        record = json.loads((data_dir / RECORD).read_text(encoding="utf-8"))
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or its process is gone
    return str(record["database_url"]), str(record["redis_url"])
