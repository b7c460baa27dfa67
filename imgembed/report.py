"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import psycopg


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.1f}s"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    lines = ["  ".join(header.ljust(width) for header, width in zip(headers, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


# The report's parts after the status table: (title, column headers, query, shown when empty).
SECTIONS: tuple[tuple[str, list[str], str, bool], ...] = (
    ("Models unavailable (their rows wait; they do not fail)", ["model", "reason", "since", "workers"],
     "SELECT model, reason, since, array_to_string(workers, ', ') FROM imgembed.unavailable_models ORDER BY model",
     False),
    ("Throughput", ["table", "model", "last minute", "last 5 minutes"],
     "SELECT table_name, model, embedded_last_minute, embedded_last_5_minutes FROM imgembed.status "
     "WHERE embedded_last_5_minutes > 0", False),
    ("Live workers", ["worker", "device", "models", "batches", "last seen"],
     "SELECT worker, device, array_to_string(models, ', '), batches, now() - last_seen FROM imgembed.workers "
     "WHERE alive ORDER BY worker", True),
    ("Failures by reason", ["table", "model", "reason", "failures"],
     "SELECT table_name, model, reason, failures FROM imgembed.failure_reasons ORDER BY failures DESC LIMIT 20",
     False),
    ("Failures (latest 20)", ["table", "key", "model", "attempts", "error"],
     "SELECT table_name, key, model, attempts, last_error FROM imgembed.failures ORDER BY failed_at DESC LIMIT 20",
     False),
)


def status_report(connection: psycopg.Connection) -> str:
    """The status view, then throughput, live workers and failures, as text."""
    status = connection.execute(
        'SELECT table_name, model, is_default, "rows", embedded, pending, in_flight, failed, oldest_pending_age '
        "FROM imgembed.status"
    ).fetchall()
    text = format_table(
        ["table", "model", "default", "rows", "embedded", "pending", "in flight", "failed", "oldest pending"], status
    )
    for title, headers, query, shown_when_empty in SECTIONS:
        rows = connection.execute(query).fetchall()
        if rows or shown_when_empty:
            text += f"\n\n{title}:\n" + (format_table(headers, rows) if rows else "(none)")
    return text
