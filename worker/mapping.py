"""2-D maps of an embedding space: a projection (scikit-learn's PCA or t-SNE, or umap-learn when
installed) and a PNG with thumbnails framed in their label's colour."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def label_colours(labels: Sequence[str | None]) -> dict[str | None, tuple[int, int, int]]:
    distinct = sorted({label for label in labels if label is not None})
    colours: dict[str | None, tuple[int, int, int]] = {None: (150, 150, 150)}
    for index, label in enumerate(distinct):
        red, green, blue = colorsys.hsv_to_rgb(index / max(1, len(distinct)), 0.75, 0.85)
        colours[label] = (int(red * 255), int(green * 255), int(blue * 255))
    return colours


def draw_map(
    coordinates: np.ndarray,
    thumbnails: Sequence[Image.Image | None],
    labels: Sequence[str | None],
    out: Path,
    *,
    size: int = 1400,
    thumb: int = 40,
    title: str = "",
    max_legend: int = 30,
) -> Path:
    """Write a PNG: each point a thumbnail (or a dot) framed in its label's colour, and a legend."""
    legend_width = 260
    canvas = Image.new("RGB", (size + legend_width, size), "white")
    draw = ImageDraw.Draw(canvas)
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    margin = thumb
    positions = margin + (coordinates - low) / span * (size - 2 * margin)
    colours = label_colours(labels)
    for (x, y), image, label in zip(positions, thumbnails, labels):
        colour = colours[label]
        left, top = int(x - thumb / 2), int(y - thumb / 2)
        if image is None:
            draw.ellipse((left + thumb / 3, top + thumb / 3, left + 2 * thumb / 3, top + 2 * thumb / 3), fill=colour)
            continue
        small = image.copy()
        small.thumbnail((thumb - 4, thumb - 4))
        draw.rectangle((left, top, left + thumb - 1, top + thumb - 1), outline=colour, width=3)
        canvas.paste(small, (left + 2, top + 2))
    if title:
        draw.text((10, 10), title, fill="black")
    y = 20
    for label, colour in list(colours.items())[: max_legend + 1]:
        if label is None and None not in labels:
            continue
        draw.rectangle((size + 10, y, size + 24, y + 14), fill=colour)
        draw.text((size + 32, y + 1), "(unlabelled)" if label is None else label[:32], fill="black")
        y += 20
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def write_html(
    coordinates: np.ndarray,
    keys: Sequence[str],
    thumbnails: Sequence[Image.Image | None],
    labels: Sequence[str | None],
    out: Path,
    *,
    title: str,
    size: int = 900,
) -> Path:
    """A self-contained page: one dot per row, coloured by label; hovering shows the image and key."""
    import base64
    import html
    import io

    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    positions = 10 + (coordinates - low) / span * (size - 20)
    colours = label_colours(labels)
    points = []
    for (x, y), key, image, label in zip(positions, keys, thumbnails, labels):
        source = ""
        if image is not None:
            small = image.copy()
            small.thumbnail((96, 96))
            buffer = io.BytesIO()
            small.convert("RGB").save(buffer, format="JPEG", quality=80)
            source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        red, green, blue = colours[label]
        points.append(
            f'<div class="p" style="left:{x:.1f}px;top:{y:.1f}px;background:rgb({red},{green},{blue})" '
            f'data-key="{html.escape(str(key))}" data-label="{html.escape(label or "")}" data-img="{source}"></div>'
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
#map {{ position: relative; width: {size}px; height: {size}px; border: 1px solid #ccc; }}
.p {{ position: absolute; width: 8px; height: 8px; margin: -4px; border-radius: 50%; cursor: pointer; }}
#tip {{ position: fixed; display: none; background: white; border: 1px solid #888; padding: 4px; font-size: 12px; }}
</style></head>
<body><h3>{html.escape(title)}</h3><div id="map">{"".join(points)}</div><div id="tip"></div>
<script>
const tip = document.getElementById("tip");
document.querySelectorAll(".p").forEach(point => {{
  point.addEventListener("mouseenter", event => {{
    tip.textContent = "";
    if (point.dataset.img) {{ const img = document.createElement("img"); img.src = point.dataset.img; tip.appendChild(img); }}
    const caption = document.createElement("div");
    caption.textContent = point.dataset.key + (point.dataset.label ? " - " + point.dataset.label : "");
    tip.appendChild(caption);
    tip.style.display = "block"; tip.style.left = (event.clientX + 12) + "px"; tip.style.top = (event.clientY + 12) + "px";
  }});
  point.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
</script></body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def map_table(
    connection: object,
    table: str,
    settings: object,
    *,
    method: str = "pca",
    color_by: str | None = None,
    out_png: Path,
    out_html: Path | None = None,
    model: str | None = None,
) -> tuple[Path, Path | None, int]:
    """Project a watched table's vectors to 2-D, store the coordinates in imgembed.projection, and
    draw the PNG (and HTML) map. Returns (png, html, rows)."""
    from psycopg import sql
    from tqdm import tqdm

    from worker.db import as_array
    from worker.images import ImageError, ImageSource, decode_image, read_source

    watch = connection.execute(  # type: ignore[attr-defined]
        "SELECT w.id, w.tbl::text, w.key_column, w.key_type, w.content_column, w.uri_column, w.label_column,"
        "       wm.storage_table, wm.model_id, m.name"
        "  FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id"
        "  JOIN imgembed.model m ON m.id = wm.model_id"
        " WHERE w.tbl = %s::regclass AND (m.name = %s OR (%s::text IS NULL AND wm.is_default))",
        (table, model, model),
    ).fetchone()
    if watch is None:
        raise LookupError(f"table {table} is not watched by imgembed (or has no such model)")
    watch_id, relation, key_column, _, content_column, uri_column, label_column, storage, model_id, model_name = watch
    colour_column = color_by or label_column
    if colour_column is not None:
        exists = connection.execute(  # type: ignore[attr-defined]
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s AND attnum > 0 AND NOT attisdropped",
            (table, colour_column)).fetchone()
        if not exists:
            raise LookupError(f"column {colour_column!r} does not exist in table {table}")

    def column_or_null(name: str | None, cast: str) -> sql.Composable:
        return sql.SQL("s.{}").format(sql.Identifier(name)) if name else sql.SQL(f"NULL::{cast}")

    statement = sql.SQL(
        "SELECT e.id::text, e.embedding, {content}, {uri}, {colour}::text FROM imgembed.{storage} e "
        "JOIN {relation} s ON s.{key} = e.id ORDER BY 1"
    ).format(
        content=column_or_null(content_column, "bytea"), uri=column_or_null(uri_column, "text"),
        colour=column_or_null(colour_column, "text"), storage=sql.Identifier(storage),
        relation=sql.SQL(relation), key=sql.Identifier(key_column),
    )
    rows = connection.execute(statement).fetchall()  # type: ignore[attr-defined]
    if len(rows) < 3:
        raise ValueError(f"table {table} has {len(rows)} embedded rows; a map needs at least 3")
    coordinates = project_2d(np.stack([as_array(row[1]) for row in rows]), method)
    with connection.transaction():  # type: ignore[attr-defined]
        connection.execute("DELETE FROM imgembed.projection WHERE watch_id = %s AND model_id = %s AND method = %s",  # type: ignore[attr-defined]
                           (watch_id, model_id, method))
        with connection.cursor() as cursor, cursor.copy(  # type: ignore[attr-defined]
            "COPY imgembed.projection (watch_id, model_id, method, key, x, y) FROM STDIN"
        ) as copy:
            for row, (x, y) in zip(rows, coordinates):
                copy.write_row((watch_id, model_id, method, row[0], float(x), float(y)))
    thumbnails: list[Image.Image | None] = []
    for row in tqdm(rows, desc="thumbnails", unit="img"):
        try:
            thumbnails.append(decode_image(read_source(ImageSource(content=row[2], uri=row[3]), settings), settings, 64))  # type: ignore[arg-type]
        except ImageError:
            thumbnails.append(None)
    labels = [row[4] for row in rows]
    title = f"{table} embedded with {model_name} ({method})"
    png = draw_map(coordinates, thumbnails, labels, out_png, title=title)
    page = write_html(coordinates, [row[0] for row in rows], thumbnails, labels, out_html, title=title) if out_html else None
    return png, page, len(rows)
