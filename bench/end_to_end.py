"""(2)-(4): rows through the whole pipeline: end-to-end throughput, one insert's latency, and what
the triggers cost an INSERT."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import psycopg

from imgembed.bench.photos import tagged_copy, tagged_files
from imgembed.bench.raw_model import RawModel
from imgembed.bench.results import BenchSize, Results
from imgembed.db import NOTIFY_CHANNEL, connect
from imgembed.local.stack import Stack
from imgembed.settings import Settings


def wait_embedded(connection: psycopg.Connection, table: str, rows: int, timeout: float = 3600,
                  fallback_seconds: float = 0.1) -> None:
    """Wait until every row has its vector or has failed. Each finished claim notifies at its
    commit, so the bench counts once per claim, right when it lands: polling every 100 ms added
    up to 100 ms to a run, and polling every 20 ms took CPU from the worker on 2 cores. A missed
    notification costs at most ``fallback_seconds``."""
    watch_id, storage = connection.execute(
        "SELECT w.id, wm.storage_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id "
        "WHERE w.table_name = %s AND wm.is_default", (table,)).fetchone()  # type: ignore[misc]
    query = (f"SELECT (SELECT count(*) FROM imgembed.{storage}) + (SELECT count(*) FROM imgembed.job "  # noqa: S608
             "WHERE watch_id = %s AND status = 'failed')")
    deadline = time.monotonic() + timeout
    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
    try:
        while time.monotonic() < deadline:
            if connection.execute(query, (watch_id,)).fetchone()[0] >= rows:  # type: ignore[index]
                return
            for _ in connection.notifies(timeout=fallback_seconds, stop_after=1):
                pass
    finally:
        connection.execute(f"UNLISTEN {NOTIFY_CHANNEL}")
    raise TimeoutError(f"{table}: {rows} rows not embedded within {timeout}s")


def insert_watched(connection: psycopg.Connection, table: str, column: str, images: list[object]) -> tuple[float, float]:
    """A new watched table ``table (id bigint, image <column>)`` holding ``images`` (bytes or paths),
    inserted in one binary COPY, image bytes stored without a compression attempt. Returns when the
    COPY started (time.perf_counter(): a run is timed from there) and the seconds it took."""
    connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, image {column})")
    if column == "bytea":
        connection.execute(f"ALTER TABLE {table} ALTER COLUMN image SET STORAGE EXTERNAL")
    connection.execute(f"SELECT imgembed.watch('{table}', 'image')")
    started = time.perf_counter()
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} (id, image) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["bigint", column])
        for number, image in enumerate(images):
            copy.write_row((number, image))
    return started, time.perf_counter() - started


def end_to_end(connection: psycopg.Connection, rows: int, as_bytes: bool, round_number: int,
               photo_dir: Path, copies_dir: Path) -> tuple[float, float]:
    """(2) rows inserted (real JPEGs) until the last vector is committed: images/s, and the seconds
    the insert itself took (one COPY: no row is visible to the pipeline before it commits). The inserter
    does what an application loading images should (README, Images): a binary COPY, and image
    bytes stored without PostgreSQL's compression attempt (JPEGs do not compress). On 2 cores,
    the text COPY into a default bytea column took 3.5 s of the run's CPU instead of 1 s.
    Every row holds bytes of its own (``tagged_copy``): the photos repeat, and workers would embed
    a repeated image once."""
    photos = [photo.read_bytes() for photo in sorted(photo_dir.glob("*.JPEG"))]
    table = f"bench_e2e_{'bytes' if as_bytes else 'paths'}_{round_number}"
    tags = [f"{table}-{i}" for i in range(rows)]
    payload: list[object] = ([tagged_copy(photos[i % len(photos)], tag) for i, tag in enumerate(tags)] if as_bytes
                             else [str(path) for path in tagged_files(photos, tags, copies_dir / table)])
    started, inserted = insert_watched(connection, table, "bytea" if as_bytes else "text", payload)
    wait_embedded(connection, f"public.{table}", rows)
    return rows / (time.perf_counter() - started), inserted


def end_to_end_figures(connection: psycopg.Connection, results: Results, size: BenchSize, settings: Settings,
                       raw_model: RawModel | None, photos: Path, rows: int, copies_dir: Path) -> None:
    """(2) for bytea and file paths. With (1), each run is set against the model alone and against
    the pipeline's bound, both measured just before and just after it (the machine's speed drifts):
    on a CPU the model and the JPEG decoding share the same cores, so an image costs at least
    1/raw + 1/decode seconds; on a GPU the slower of the two sets the pace."""
    on_gpu = settings.device.startswith("cuda")
    photo_bytes = [photo.read_bytes() for photo in sorted(photos.glob("*.JPEG"))]
    sample = [photo_bytes[i % len(photo_bytes)] for i in range(min(rows, 1000))]

    def limits() -> tuple[float, float]:
        """(model alone, decoding alone) in images/s, now."""
        if raw_model is None:
            return float("nan"), float("nan")
        return raw_model.throughput(), raw_model.decode_images_per_s(sample, settings)

    def bound(raw: float, decode: float) -> float:
        return min(raw, decode) if on_gpu else 1 / (1 / raw + 1 / decode)

    decodes: list[float] = []
    # Per form (bytea, file paths): each run's rate, ratios to the model and to the bound, COPY
    # seconds, and ratio to the bound from the COPY's commit on.
    runs: dict[bool, list[tuple[float, float, float, float, float]]] = {True: [], False: []}
    after = limits()  # each run's "after" is also the next run's "before": they would be back to back
    for attempt in range(size.repeats):
        for as_bytes in (True, False):  # alternated, so that both forms meet the machine's drift alike
            before = after
            rate, inserted = end_to_end(connection, rows, as_bytes, attempt, photos, copies_dir)
            after = limits()
            raw, decode = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            decodes.append(decode)
            limit = bound(raw, decode)
            runs[as_bytes].append((rate, rate / raw, rate / limit, inserted, rows / (rows / rate - inserted) / limit))
    for as_bytes in (True, False):
        kind = "bytea" if as_bytes else "file paths"
        rate, ratio, bound_ratio, insert, after_copy_ratio = (statistics.median(column) for column in zip(*runs[as_bytes]))
        results.add(f"e2e_{kind}", {"images_per_s": rate, "ratio_to_raw": ratio, "ratio_to_bound": bound_ratio,
                                    "insert_s": insert, "ratio_to_bound_after_copy": after_copy_ratio},
                    f"- (2) end to end, {rows} rows of real JPEGs as {kind}, insert to last vector committed: "
                    f"{rate:.1f} images/s"
                    + (f" = {ratio:.0%} of (1) and {bound_ratio:.0%} of the bound (medians of {size.repeats} runs, "
                       f"each against (1) and decoding measured just before and after it)" if raw_model else "")
                    + f"; a run takes {rows / rate:.2f} s, the COPY {insert:.2f} s of it"
                    + (f" (from the COPY's commit to the last vector: {after_copy_ratio:.0%} of the bound)"
                       if raw_model and insert >= 0.05 * rows / rate else ""))
    if raw_model is not None:
        decode = statistics.median(decodes)
        results.add("decode_images_per_s", decode,
                    f"- (2) JPEG bytes to model-ready tensors alone, as the worker does it (Pillow, "
                    f"{settings.decode_threads} decode threads): {decode:.1f} images/s (median over the runs); "
                    + ("on a GPU the slower of it and (1) bounds (2)" if on_gpu else
                       "on a CPU the model and decoding share the cores, so (2) is bounded by 1/(1/raw + 1/decode)"))


def insert_latency(connection: psycopg.Connection, inserts: int, photo_dir: Path) -> tuple[float, float]:
    """(3) one INSERT's commit to its vector's commit, at idle: p50 and p95 in ms. Each insert's
    bytes are its own, so each is embedded."""
    photo = sorted(photo_dir.glob("*.JPEG"))[0].read_bytes()
    connection.execute("CREATE TABLE bench_latency (id bigint PRIMARY KEY, image bytea)")
    connection.execute("SELECT imgembed.watch('bench_latency', 'image')")
    storage = connection.execute("SELECT imgembed.storage_table('bench_latency')").fetchone()[0]  # type: ignore[index]
    latencies = []
    for i in range(inserts):
        connection.execute("INSERT INTO bench_latency VALUES (%s, %s)",  # autocommit: committed now
                           (i, tagged_copy(photo, f"bench_latency-{i}")))
        committed = time.perf_counter()
        while not connection.execute(f"SELECT 1 FROM {storage} WHERE id = %s", (i,)).fetchone():
            time.sleep(0.002)
        latencies.append((time.perf_counter() - committed) * 1000)
        time.sleep(0.3)  # idle between inserts
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))


def trigger_overhead(connection: psycopg.Connection, rows: int, repeats: int) -> tuple[float, float]:
    """(4) rows/s of one multi-row INSERT into an unwatched and a watched table, in turns. A
    watched insert sets work going after its commit: the dispatcher expands its rows into jobs,
    unwatch() deletes them, and autovacuum follows. Measured all unwatched first and then all
    watched, each watched insert shared the 2 cores with the previous one's aftermath (46-85% over
    runs); so each insert starts once that work is done and the queue tables are vacuumed."""
    def settle() -> None:
        connection.execute("VACUUM imgembed.intake, imgembed.job")
        time.sleep(0.5)  # the dispatcher and worker finish with the claims sent before unwatch()

    def insert_rate(watched: bool, attempt: int) -> float:
        table = f"bench_trigger_{'w' if watched else 'u'}_{attempt}"
        connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, path text)")
        if watched:
            connection.execute(f"SELECT imgembed.watch('{table}', 'path')")
        settle()
        started = time.perf_counter()
        connection.execute(f"INSERT INTO {table} SELECT g, '/images/' || g || '.jpg' FROM generate_series(1, %s) g", (rows,))
        rate = rows / (time.perf_counter() - started)
        if watched:
            connection.execute(f"SELECT imgembed.unwatch('{table}')")
        connection.execute(f"DROP TABLE {table}")
        return rate

    unwatched, watched = [], []
    for attempt in range(repeats):
        unwatched.append(insert_rate(False, attempt))
        watched.append(insert_rate(True, attempt))
    return statistics.median(unwatched), statistics.median(watched)


def wait_ready(stack: Stack, photo_dir: Path, timeout: float = 300) -> None:
    """Wait until the worker has loaded its model and answers (one tiny job round trip)."""
    with connect(stack.settings.database_url or "") as connection:
        connection.execute("CREATE TABLE bench_warmup (id bigint PRIMARY KEY, image bytea)")
        connection.execute("SELECT imgembed.watch('bench_warmup', 'image')")
        connection.execute("INSERT INTO bench_warmup VALUES (1, %s)", (sorted(photo_dir.glob("*.JPEG"))[0].read_bytes(),))
        wait_embedded(connection, "public.bench_warmup", 1, timeout)
