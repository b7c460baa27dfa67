"""(9) identical images are embedded once: rows that repeat a few distinct images against rows that
are all distinct, through the whole pipeline."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psycopg

from imgembed.bench.end_to_end import insert_watched, wait_embedded
from imgembed.bench.photos import tagged_copy
from imgembed.bench.results import BenchSize, Results

REPEATS_PER_IMAGE = 10  # 1,000 rows repeat 100 distinct images


def _seconds_to_embed(connection: psycopg.Connection, table: str, images: list[bytes]) -> float:
    """Rows of ``images`` (as bytea, one COPY) from the insert to the last vector committed."""
    started, _ = insert_watched(connection, table, "bytea", list(images))
    wait_embedded(connection, f"public.{table}", len(images))
    return time.perf_counter() - started


def repeated_images_figure(connection: psycopg.Connection, results: Results, size: BenchSize, photo_dir: Path) -> None:
    """(9): the same number of rows, all distinct, then repeating one image in REPEATS_PER_IMAGE;
    alternated over the runs, each with bytes never seen before (tagged copies of the photos)."""
    photos = [photo.read_bytes() for photo in sorted(photo_dir.glob("*.JPEG"))]
    rows = size.e2e_rows
    distinct_count = max(rows // REPEATS_PER_IMAGE, 1)
    distinct_runs, repeated_runs = [], []
    for attempt in range(size.repeats):
        all_distinct = [tagged_copy(photos[i % len(photos)], f"distinct-{attempt}-{i}") for i in range(rows)]
        distinct_runs.append(_seconds_to_embed(connection, f"bench_distinct_{attempt}", all_distinct))
        few = [tagged_copy(photos[i % len(photos)], f"repeated-{attempt}-{i}") for i in range(distinct_count)]
        repeated_runs.append(_seconds_to_embed(connection, f"bench_repeated_{attempt}",
                                               [few[i % distinct_count] for i in range(rows)]))
    distinct_s, repeated_s = statistics.median(distinct_runs), statistics.median(repeated_runs)
    results.add("repeated_images", {"rows": rows, "distinct_images": distinct_count, "all_distinct_s": distinct_s,
                                    "repeated_s": repeated_s, "ratio": repeated_s / distinct_s},
                f"- (9) {rows} rows as bytea, insert to last vector committed: all distinct {distinct_s:.1f} s; "
                f"repeating {distinct_count} distinct images {repeated_s:.1f} s = {repeated_s / distinct_s:.0%} of "
                f"the time (identical bytes are embedded once; medians of {size.repeats} runs)")
