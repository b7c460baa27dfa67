"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta


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


def status_report(connection: object) -> str:
    """The status and failures views, as text."""
    status = connection.execute(  # type: ignore[attr-defined]
        'SELECT table_name, model, is_default, "rows", embedded, pending, in_flight, failed, oldest_pending_age '
        "FROM imgembed.status"
    ).fetchall()
    text = format_table(
        ["table", "model", "default", "rows", "embedded", "pending", "in flight", "failed", "oldest pending"], status
    )
    failures = connection.execute(  # type: ignore[attr-defined]
        "SELECT table_name, key, model, attempts, last_error FROM imgembed.failures ORDER BY failed_at DESC LIMIT 20"
    ).fetchall()
    if failures:
        text += "\n\nFailures (latest 20):\n" + format_table(["table", "key", "model", "attempts", "error"], failures)
    return text
