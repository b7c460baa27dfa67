"""``imgembed demo``: a fresh local stack, generated images in (and the user's photos, if given),
embeddings out, then the main questions answered in SQL and a picture of the embedding space.
Needs nothing but the package: the images are drawn here, and a model that cannot be loaded
falls back to the bundled imgembed-shapes, which was trained on such images."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image

from imgembed.analysis.drawing import draw_map
from imgembed.analysis.maps import project_2d
from imgembed.db import as_array, connect
from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.images.sources import ImageSource, read_source
from imgembed.ingest import ingest_paths
from imgembed.local.stack import local_stack
from imgembed.models.names import parse_model_spec
from imgembed.models.registry import register_model, wait_for_backfill
from imgembed.report import format_table, status_report
from imgembed.settings import DEFAULT_MODEL, Settings
from imgembed.training.synthetic import random_shapes
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.embedding import load_model

FALLBACK_MODEL = "imgembed-shapes"
WAIT_LIMIT_SECONDS = 600
HELD_OUT = 12  # generated images left unlabelled, for the kNN labels


def choose_model(settings: Settings) -> tuple[str, str]:
    """The model to demo and why: the configured one if it loads, else the bundled trained one."""
    try:
        load_model(parse_model_spec(settings.model), "cpu", model_dir=settings.models_path)
    except ModelLoadError as error:
        return FALLBACK_MODEL, (f"fallback to the bundled {FALLBACK_MODEL} model, trained by this project on "
                                f"generated shapes, because {settings.model} could not be loaded ({error})")
    origin = "the default pretrained model" if settings.model == DEFAULT_MODEL else "IMGEMBED_MODEL"
    return settings.model, f"{origin} loaded"


def photo_labels(photos_dir: Path) -> dict[Path, str]:
    labels_file = photos_dir / "LABELS.csv"
    if not labels_file.exists():
        return {}
    with labels_file.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    file_column = next((i for i, name in enumerate(header) if name.lower() in ("file", "filename", "path")), 0)
    label_column = next((i for i, name in enumerate(header) if name.lower() in ("label", "class", "name")), 1)
    return {(photos_dir / row[file_column]).resolve(): row[label_column] for row in body if len(row) > label_column}


def section(title: str, headers: list[str], rows: list[tuple[object, ...]]) -> None:
    print(f"\n== {title}\n{format_table(headers, rows)}")


def ingest_generated(connection: psycopg.Connection, count: int) -> tuple[int, dict[str, list[int]]]:
    """Generated shapes labelled "colour shape"; the last HELD_OUT stay unlabelled (truth in metadata)."""
    ids_by_label: dict[str, list[int]] = {}
    shapes = random_shapes(count, seed=7)
    with connection.cursor() as cursor:
        for index, shape in enumerate(shapes):
            truth = f"{shape.colour} {shape.shape}"
            label = None if index >= count - HELD_OUT else truth
            cursor.execute(
                "INSERT INTO imgembed.image (content, label, metadata) VALUES (%s, %s, %s) RETURNING id",
                (shape.png_bytes(), label, json.dumps({"truth": truth, "caption": shape.caption})),
            )
            ids_by_label.setdefault(truth, []).append(cursor.fetchone()[0])  # type: ignore[index]
    return len(shapes), ids_by_label


def show_answers(connection: psycopg.Connection, ids_by_label: dict[str, list[int]]) -> None:
    join = "JOIN imgembed.image i ON i.id = r.id"
    label = "coalesce(i.label, '(unlabelled) ' || (i.metadata->>'truth'))"
    section("Text search: 'a red circle'", ["id", "label", "distance"], connection.execute(
        f"SELECT r.id, {label}, round(r.distance::numeric, 4) FROM "
        f"imgembed.search_text('imgembed.image', NULL::bigint, 'a red circle', 5, timeout_seconds => 60) r {join} "
        "ORDER BY r.distance").fetchall())
    anchor = ids_by_label.get("blue square", next(iter(ids_by_label.values())))[0]
    section(f"Images similar to #{anchor} ({label_of(connection, anchor)})", ["id", "label", "distance"],
            connection.execute(f"SELECT r.id, {label}, round(r.distance::numeric, 4) FROM "
                               f"imgembed.similar('imgembed.image', %s::bigint, 5) r {join} ORDER BY r.distance",
                               (anchor,)).fetchall())
    section("kNN labels for unlabelled images (imgembed.predicted_labels)", ["id", "predicted", "confidence", "truth"],
            connection.execute(
                "SELECT p.key, p.label, round(p.confidence::numeric, 2), i.metadata->>'truth' "
                "FROM imgembed.predicted_labels('imgembed.image', NULL::bigint) p JOIN imgembed.image i ON i.id = p.key "
                "WHERE i.metadata ? 'truth' ORDER BY p.key").fetchall())
    liked = ids_by_label.get("yellow triangle", [])[:2] or [anchor]
    disliked = ids_by_label.get("green circle", [])[:1]
    section(f"Recommended for a user who liked {liked} and disliked {disliked}", ["id", "label", "score"],
            connection.execute(
                f"SELECT r.id, {label}, round(r.score::numeric, 4) FROM "
                f"imgembed.recommend('imgembed.image', %s::bigint[], %s::bigint[], 5) r {join} ORDER BY r.score DESC",
                (liked, disliked)).fetchall())


def label_of(connection: psycopg.Connection, key: int) -> str:
    return connection.execute("SELECT coalesce(label, metadata->>'truth') FROM imgembed.image WHERE id = %s",
                              (key,)).fetchone()[0]  # type: ignore[index]


def write_map(connection: psycopg.Connection, settings: Settings, model: str, out: Path) -> Path:
    storage = connection.execute("SELECT imgembed.storage_table('imgembed.image', %s)", (model,)).fetchone()[0]  # type: ignore[index]
    rows = connection.execute(
        f"SELECT i.content, i.uri, coalesce(i.label, i.metadata->>'truth'), e.embedding "  # noqa: S608 - catalog name
        f"FROM imgembed.image i JOIN {storage} e ON e.id = i.id ORDER BY i.id").fetchall()
    vectors = np.stack([as_array(row[3]) for row in rows])
    thumbnails: list[Image.Image | None] = []
    for content, uri, _, _ in rows:
        try:
            thumbnails.append(decode_image(read_source(ImageSource(content=content, uri=uri), settings), settings, 64))
        except ImageError:
            thumbnails.append(None)
    return draw_map(project_2d(vectors, "pca"), thumbnails, [row[2] for row in rows], out,
                    title=f"imgembed.image embedded with {model} (PCA)")


def run_demo(settings: Settings, photos_dir: str | None = None, generated: int = 300,
             map_out: str = "imgembed-demo-map.png") -> int:
    started = time.monotonic()
    model, reason = choose_model(settings)
    print(f"model: {model}\n  why: {reason}")
    demo_dir = settings.data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_settings = settings.with_overrides(model=model, data_dir=demo_dir)
    with local_stack(demo_settings) as stack:
        print(f"services up: DATABASE_URL={stack.settings.database_url}")
        with connect(stack.settings.database_url or "") as connection:
            register_model(connection, model, make_default=True, model_dir=settings.models_path)
            connection.execute("SELECT imgembed.add_model('imgembed.image', %s)", (model,))
            connection.execute("SELECT imgembed.use_model('imgembed.image', %s, force => true)", (model,))
            total = 0
            if photos_dir:
                photos = Path(photos_dir)
                total += ingest_paths(connection, [photos], labels=photo_labels(photos))
                print(f"ingested {total} photos from {photos}")
            count, ids_by_label = ingest_generated(connection, generated)
            total += count
            print(f"inserted {count} generated images ({HELD_OUT} unlabelled); {total} in all")
            wait_for_backfill(connection, model, ["imgembed.image"], timeout=WAIT_LIMIT_SECONDS, desc="embedding")
            show_answers(connection, ids_by_label)
            print("\n== Status (imgembed.status)\n" + status_report(connection))
            picture = write_map(connection, settings, model, Path(map_out).resolve())
            print(f"\nembedding map: {picture}")
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0

