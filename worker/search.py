"""Searching from Python (and the CLI): thin calls of the SQL functions in ``sql/6*.sql``."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

from worker.embedding import load_model
from worker.images import ImageSource, decode_image, read_source
from worker.model_spec import parse_model_spec
from worker.settings import Settings

# The key types watch() accepts, as SQL type names (never built from user text).
KEY_TYPES = {name: sql.SQL(name) for name in ("bigint", "integer", "smallint", "uuid", "text")}

Hit = tuple[object, float]


def _key_type(connection: psycopg.Connection, table: str) -> sql.Composable:
    row = connection.execute(
        "SELECT key_type FROM imgembed.watch WHERE tbl = %s::regclass", (table,)
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


def search_like(connection: psycopg.Connection, table: str, key: str, k: int = 10) -> list[Hit]:
    statement = sql.SQL("SELECT id, distance FROM imgembed.similar(%s::regclass, %s::{}, %s)").format(
        _key_type(connection, table)
    )
    return [(row[0], row[1]) for row in connection.execute(statement, (table, key, k))]


def search_image(
    connection: psycopg.Connection, table: str, image_path: Path, settings: Settings, k: int = 10
) -> list[Hit]:
    """Embed a local image file here, with the table's default model, and search with it."""
    row = connection.execute(
        "SELECT m.name FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id AND wm.is_default "
        "JOIN imgembed.model m ON m.id = wm.model_id WHERE w.tbl = %s::regclass",
        (table,),
    ).fetchone()
    if row is None:
        raise LookupError(f"table {table} is not watched by imgembed or has no model")
    model = load_model(parse_model_spec(row[0]), settings.device, tower="image")
    data = read_source(ImageSource(uri=str(image_path.expanduser().resolve())), settings)
    pixels = model.preprocess(decode_image(data, settings, target_size=model.input_size)).unsqueeze(0)
    vector = model.embed_pixels(pixels)[0]
    return [
        (row[0], row[1])
        for row in connection.execute(
            "SELECT id, distance FROM imgembed.similar_to_vector(%s::regclass, %s, %s)", (table, vector, k)
        )
    ]
