"""Searching from Python (and the CLI): thin calls of the SQL functions in ``sql/6*.sql``."""

from __future__ import annotations

import psycopg
from psycopg import sql

# The key types watch() accepts, as SQL type names (never built from user text).
KEY_TYPES = {name: sql.SQL(name) for name in ("bigint", "integer", "smallint", "uuid", "text")}

Hit = tuple[object, float]


def _key_type(connection: psycopg.Connection, table: str) -> sql.Composable:
    row = connection.execute(
        "SELECT key_type FROM imgembed._live_watch WHERE tbl = %s::regclass", (table,)
    ).fetchone()
    if row is None:
        raise LookupError(f"table {table} is not watched by imgembed")
    return KEY_TYPES[row[0]]


def search_text(connection: psycopg.Connection, table: str, query: str, k: int = 10, timeout_seconds: float = 30) -> list[Hit]:
    return [
        (row[0], row[1])
        for row in connection.execute(
            "SELECT id, distance FROM imgembed.search_text(%s::regclass, %s, %s, timeout_seconds => %s)",
            (table, query, k, timeout_seconds),
        )
    ]


def search_image(connection: psycopg.Connection, table: str, image: bytes, k: int = 10,
                 timeout_seconds: float = 30) -> list[Hit]:
    """Rows like image bytes that are in no table: the workers embed them (``imgembed.search_image``)."""
    return [
        (row[0], row[1])
        for row in connection.execute(
            "SELECT id, distance FROM imgembed.search_image(%s::regclass, %s::bytea, %s, timeout_seconds => %s)",
            (table, image, k, timeout_seconds),
        )
    ]


def search_like(connection: psycopg.Connection, table: str, key: str, k: int = 10) -> list[Hit]:
    statement = sql.SQL("SELECT id, distance FROM imgembed.similar(%s::regclass, %s::{}, %s)").format(
        _key_type(connection, table)
    )
    return [(row[0], row[1]) for row in connection.execute(statement, (table, key, k))]
