"""``imgembed bench --reduce``: what a reduced model (imgembed.reduce) keeps and saves. Real photos
(varied crops of the test photos) are embedded through the pipeline, reduced to each dimension by
a worker, and every model's searches are set against the full model's exact neighbours."""

from __future__ import annotations

import io
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import psycopg

from imgembed.bench.end_to_end import insert_watched, wait_embedded
from imgembed.bench.machine import database_description, git_revision, machine_description
from imgembed.bench.results import Results, write_results
from imgembed.db import connect
from imgembed.local.stack import local_stack
from imgembed.models.names import parse_model_spec
from imgembed.models.registry import register_model, wait_for_fit
from imgembed.settings import Settings

TABLE = "bench_reduce"
K = 10


def varied_photos(photo_dir: Path, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs: crops (40-100% of each side), mirror images and colour changes of the photos
    in turn, so that each photo has many near neighbours and they all differ."""
    from PIL import Image, ImageEnhance

    sources = [Image.open(path).convert("RGB") for path in sorted(photo_dir.glob("*.JPEG"))]
    rng = random.Random(seed)
    out = []
    for number in range(count):
        image = sources[number % len(sources)]
        width, height = image.size
        crop_w, crop_h = int(width * rng.uniform(0.4, 1.0)), int(height * rng.uniform(0.4, 1.0))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        varied = image.crop((left, top, left + crop_w, top + crop_h)).resize((256, 256))
        if rng.random() < 0.5:
            varied = varied.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        varied = ImageEnhance.Color(varied).enhance(rng.uniform(0.6, 1.4))
        varied = ImageEnhance.Brightness(varied).enhance(rng.uniform(0.7, 1.3))
        buffer = io.BytesIO()
        varied.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def _neighbours(connection: psycopg.Connection, model: str, keys: list[int], exact: bool) -> tuple[list[list[int]], list[float]]:
    """Each key's 10 nearest rows under ``model`` (itself left out), and each search's milliseconds."""
    found, milliseconds = [], []
    for key in keys:
        started = time.perf_counter()
        rows = connection.execute("SELECT id FROM imgembed.similar(%s, %s, %s, model => %s, exact => %s)",
                                  (TABLE, key, K, model, exact)).fetchall()
        milliseconds.append(1000 * (time.perf_counter() - started))
        found.append([int(row[0]) for row in rows])
    return found, milliseconds


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def _sizes_mb(connection: psycopg.Connection, model: str) -> tuple[float, float]:
    """The model's vector table (without its indexes) and its HNSW index, in MB."""
    storage = connection.execute("SELECT imgembed.storage_table(%s, %s)::text", (TABLE, model)).fetchone()[0]  # type: ignore[index]
    table_mb, index_mb = connection.execute(
        "SELECT pg_table_size(%s::regclass) / 1e6, pg_relation_size((%s || '_hnsw')::regclass) / 1e6",
        (storage, storage)).fetchone()  # type: ignore[misc]
    return float(table_mb), float(index_mb)


def _projection_ms(connection: psycopg.Connection, source: str, reduced: str) -> float:
    """Milliseconds to project one of the table's source vectors (what finish_batch adds to each
    vector the source model writes), over all of them."""
    storage = connection.execute("SELECT imgembed.storage_table(%s, %s)::text", (TABLE, source)).fetchone()[0]  # type: ignore[index]
    started = time.perf_counter()
    (count,) = connection.execute(
        f"SELECT count(imgembed._project((SELECT id FROM imgembed.model WHERE name = %s), e.embedding)) FROM {storage} e",
        (reduced,)).fetchone()  # type: ignore[misc]
    return 1000 * (time.perf_counter() - started) / count


def _fit(connection: psycopg.Connection, dims: int) -> tuple[str, float, float]:
    """Reduce to ``dims`` and wait for the worker: the model's name, the seconds from the request
    to every vector projected and indexed, and the share of variance kept."""
    started = time.perf_counter()
    (name,) = connection.execute("SELECT imgembed.reduce(%s, dims => %s)", (TABLE, dims)).fetchone()  # type: ignore[misc]
    _, kept = wait_for_fit(connection, name, timeout=3600, poll_seconds=0.1)
    return name, time.perf_counter() - started, kept


def reduction_figures(settings: Settings, *, model: str, dims: tuple[int, ...], rows: int, queries: int,
                      photos: Path, out: Path) -> Results:
    results = Results()
    weights = "random weights" if parse_model_spec(model).random_weights else "trained weights"
    results.lines += ["# Reduced models: recall, index size and search time", "",
                      f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {git_revision()} with "
                      f"`imgembed bench --reduce {','.join(map(str, dims))} --model {model} --rows {rows} --photos "
                      f"{photos.name}`.", ""]
    results.lines += machine_description()
    results.lines += [f"- model: {model} ({weights}); {rows} varied crops of the {len(list(photos.glob('*.JPEG')))} "
                      f"photos in {photos.name}/, embedded through the pipeline; {queries} query rows; recall@{K} "
                      f"against the full model's exact {K} nearest rows", ""]
    data_dir = settings.data_dir / "bench-reduce"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh database each run
    stack_settings = settings.with_overrides(model=model, data_dir=data_dir)
    with local_stack(stack_settings, durable=False) as stack, connect(stack.settings.database_url or "") as connection:
        database = database_description(connection)
        results.lines += [f"- database: PostgreSQL {database['postgres']}, pgvector {database['pgvector']}", ""]
        register_model(connection, model, make_default=True, model_dir=settings.models_path)
        insert_watched(connection, TABLE, "bytea", list(varied_photos(photos, rows)))
        wait_embedded(connection, f"public.{TABLE}", rows)
        connection.execute(f"ANALYZE {TABLE}")
        keys = random.Random(1).sample(range(1, rows + 1), queries)
        truth, exact_ms = _neighbours(connection, model, keys, exact=True)
        found, milliseconds = _neighbours(connection, model, keys, exact=False)
        full_table_mb, full_index_mb = _sizes_mb(connection, model)
        full_ms, full_exact_ms = statistics.median(milliseconds), statistics.median(exact_ms)
        results.add("full", {"dims": None, "recall_index": _recall(found, truth), "search_ms_p50": full_ms,
                             "exact_ms_p50": full_exact_ms, "table_mb": full_table_mb, "index_mb": full_index_mb},
                    "| model | dims | variance kept | recall@10, index | recall@10, exact | search p50, index | "
                    "search p50, exact | vector table | HNSW index | fit + projection | projection per row |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|\n"
                    f"| {model} | full | 100% | {_recall(found, truth):.3f} | 1.000 | {full_ms:.1f} ms | "
                    f"{full_exact_ms:.1f} ms | {full_table_mb:.1f} MB | {full_index_mb:.1f} MB | | |")
        for dim in dims:
            name, fit_s, kept = _fit(connection, dim)
            connection.execute(f"ANALYZE {TABLE}")
            found, milliseconds = _neighbours(connection, name, keys, exact=False)
            exact_found, exact_ms = _neighbours(connection, name, keys, exact=True)
            table_mb, index_mb = _sizes_mb(connection, name)
            search_ms, search_exact_ms = statistics.median(milliseconds), statistics.median(exact_ms)
            projection_ms = _projection_ms(connection, model, name)
            results.add(f"pca{dim}", {"dims": dim, "variance_kept": kept, "recall_index": _recall(found, truth),
                                      "recall_exact": _recall(exact_found, truth), "search_ms_p50": search_ms,
                                      "exact_ms_p50": search_exact_ms, "table_mb": table_mb, "index_mb": index_mb,
                                      "fit_s": fit_s, "projection_ms_per_row": projection_ms},
                        f"| {name} | {dim} | {kept:.1%} | {_recall(found, truth):.3f} | "
                        f"{_recall(exact_found, truth):.3f} | {search_ms:.1f} ms | {search_exact_ms:.1f} ms | "
                        f"{table_mb:.1f} MB | {index_mb:.1f} MB ({index_mb / full_index_mb:.0%}) | {fit_s:.1f} s | "
                        f"{projection_ms:.2f} ms |")
    results.lines += ["", "recall@10, index: similar() through the HNSW index, as applications search; exact: the "
                      "reduced vectors scanned exactly (exact => true), which isolates what the projection loses; "
                      "search p50: the median similar() call of each kind. "
                      "Fit + projection: from imgembed.reduce() to every row projected and indexed (a worker's "
                      "PCA, then the projection in SQL and the index build). Projection per row: what each vector the "
                      "source model writes costs PostgreSQL in the same transaction, measured over the table."]
    return write_results(results, out)
