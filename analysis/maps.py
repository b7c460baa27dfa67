"""2-D maps of a watched table's vectors: a projection (scikit-learn's PCA or t-SNE, or umap-learn
when installed), its coordinates stored in ``imgembed.projection``, and the pictures of it
(``imgembed.analysis.drawing``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from imgembed.analysis.drawing import draw_map, write_html
from imgembed.db import as_array
from imgembed.settings import Settings

METHODS = ("pca", "tsne", "umap")


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) vectors -> (N, 2) coordinates."""
    if len(vectors) < 3:
        raise ValueError(f"a map needs at least 3 vectors, got {len(vectors)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(vectors)
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ValueError("--method umap needs umap-learn (pip install umap-learn); try tsne or pca") from error
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(vectors)
    raise ValueError(f"unknown projection {method!r}; use one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class MapSource:
    """What a map of one (table, model) reads: the watch's columns and its vector table."""

    watch_id: int
    relation: str
    key_column: str
    content_column: str | None
    uri_column: str | None
    colour_column: str | None
    storage: str
    model_id: int
    model_name: str


def _map_source(connection: psycopg.Connection, table: str, model: str | None, color_by: str | None) -> MapSource:
    watch = connection.execute(
        "SELECT w.id, w.tbl::text, w.key_column, w.content_column, w.uri_column, w.label_column,"
        "       wm.storage_table, wm.model_id, m.name"
        "  FROM imgembed._live_watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id"
        "  JOIN imgembed.model m ON m.id = wm.model_id"
        " WHERE w.tbl = %s::regclass AND (m.name = %s OR (%s::text IS NULL AND wm.is_default))",
        (table, model, model),
    ).fetchone()
    if watch is None:
        raise LookupError(f"table {table} is not watched by imgembed (or has no such model)")
    watch_id, relation, key_column, content_column, uri_column, label_column, storage, model_id, model_name = watch
    colour_column = color_by or label_column
    if colour_column is not None:
        exists = connection.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s AND attnum > 0 AND NOT attisdropped",
            (table, colour_column)).fetchone()
        if not exists:
            raise LookupError(f"column {colour_column!r} does not exist in table {table}")
    return MapSource(watch_id, relation, key_column, content_column, uri_column, colour_column, storage, model_id,
                     model_name)


def _embedded_rows(connection: psycopg.Connection, source: MapSource) -> list[tuple[object, ...]]:
    """(key as text, vector, image bytes, image location, colour) of every embedded row, by key."""
    def column_or_null(name: str | None, cast: str) -> sql.Composable:
        return sql.SQL("s.{}").format(sql.Identifier(name)) if name else sql.SQL(f"NULL::{cast}")

    statement = sql.SQL(
        "SELECT e.id::text, e.embedding, {content}, {uri}, {colour}::text FROM imgembed.{storage} e "
        "JOIN {relation} s ON s.{key} = e.id ORDER BY 1"
    ).format(
        content=column_or_null(source.content_column, "bytea"), uri=column_or_null(source.uri_column, "text"),
        colour=column_or_null(source.colour_column, "text"), storage=sql.Identifier(source.storage),
        relation=sql.SQL(source.relation), key=sql.Identifier(source.key_column),
    )
    return connection.execute(statement).fetchall()


def _store_projection(connection: psycopg.Connection, source: MapSource, method: str, keys: list[str],
                      coordinates: np.ndarray) -> None:
    """Replace this (table, model, method)'s coordinates in imgembed.projection."""
    with connection.transaction():
        connection.execute("DELETE FROM imgembed.projection WHERE watch_id = %s AND model_id = %s AND method = %s",
                           (source.watch_id, source.model_id, method))
        with connection.cursor() as cursor, cursor.copy(
            "COPY imgembed.projection (watch_id, model_id, method, key, x, y) FROM STDIN"
        ) as copy:
            for key, (x, y) in zip(keys, coordinates):
                copy.write_row((source.watch_id, source.model_id, method, key, float(x), float(y)))


def _thumbnails(rows: list[tuple[object, ...]], settings: Settings) -> list[object]:
    """Each row's picture at about 64 pixels, or None where it cannot be read."""
    from tqdm import tqdm

    from imgembed.images.decode import decode_image
    from imgembed.images.image_error import ImageError
    from imgembed.images.sources import ImageSource, read_source

    thumbnails: list[object] = []
    for row in tqdm(rows, desc="thumbnails", unit="img"):
        try:
            data = read_source(ImageSource(content=row[2], uri=row[3]), settings)
            thumbnails.append(decode_image(data, settings, 64))
        except ImageError:
            thumbnails.append(None)
    return thumbnails


def map_table(connection: psycopg.Connection, table: str, settings: Settings, *, method: str = "pca",
              color_by: str | None = None, out_png: Path, out_html: Path | None = None,
              model: str | None = None) -> tuple[Path, Path | None, int]:
    """Project a watched table's vectors to 2-D, store the coordinates in imgembed.projection, and
    draw the PNG (and HTML) map. Returns (png, html, rows)."""
    source = _map_source(connection, table, model, color_by)
    rows = _embedded_rows(connection, source)
    if len(rows) < 3:
        raise ValueError(f"table {table} has {len(rows)} embedded rows; a map needs at least 3")
    keys = [str(row[0]) for row in rows]
    coordinates = project_2d(np.stack([as_array(row[1]) for row in rows]), method)
    _store_projection(connection, source, method, keys, coordinates)
    thumbnails = _thumbnails(rows, settings)
    labels = [row[4] for row in rows]
    title = f"{table} embedded with {source.model_name} ({method})"
    png = draw_map(coordinates, thumbnails, labels, out_png, title=title)  # type: ignore[arg-type]
    page = write_html(coordinates, keys, thumbnails, labels, out_html, title=title) if out_html else None  # type: ignore[arg-type]
    return png, page, len(rows)
