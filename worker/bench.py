"""``imgembed bench``: measure the system on the embedded services and write bench/RESULTS.md.

Every figure is the median of several runs. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import torch

from worker.db import connect
from worker.embedding import load_model
from worker.model_spec import parse_model_spec
from worker.models import register_model
from worker.pipeline import forward_batch_size
from worker.settings import Settings
from worker.stack import Stack, local_stack

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "photos"


@dataclass(frozen=True)
class BenchSize:
    e2e_rows: int = 1000
    e2e_rows_gpu: int = 10_000  # a GPU embeds 1,000 rows in well under a second
    latency_inserts: int = 50
    trigger_rows: int = 100_000
    search_vectors: int = 100_000
    search_dim: int = 512
    search_queries: int = 100
    raw_images: int = 256
    repeats: int = 3


SMOKE = BenchSize(e2e_rows=24, e2e_rows_gpu=24, latency_inserts=3, trigger_rows=500, search_vectors=2000, search_dim=64,
                  search_queries=5, raw_images=16, repeats=1)


@dataclass
class Results:
    lines: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def add(self, key: str, value: object, text: str) -> None:
        self.figures[key] = value
        self.lines.append(text)
        print(text, flush=True)


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def machine_description() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import open_clip
    import pgvector

    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, GPU: {gpu}",
        f"- python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"pgvector-python {getattr(pgvector, '__version__', '?')}",
    ]


class RawModel:
    """(1): the model alone in the bench process, timed on already-preprocessed tensors. Kept
    loaded, so (2) can measure it again just before each run: on a shared machine the CPU's speed
    drifts over minutes, and a ratio of two figures taken minutes apart would measure the drift."""

    def __init__(self, model_name: str, device: str) -> None:
        self.model = load_model(parse_model_spec(model_name), device, tower="image")

    def images_per_s(self, images: int, batch_size: int) -> float:
        pixels = torch.randn(batch_size, 3, self.model.input_size, self.model.input_size)
        self.model.embed_pixels(pixels)  # warm-up
        started = time.perf_counter()
        done = 0
        while done < images:
            self.model.embed_pixels(pixels)
            done += batch_size
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - started)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS), or its high-water mark since it started (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class GpuSampler(threading.Thread):
    """GPU memory in use and utilisation while a measurement runs, from nvidia-smi every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_memory_mb = 0.0
        self.utilisation: list[float] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "--id=0"]
        while not self.stop.wait(0.2):
            try:
                utilisation, memory = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue
            self.utilisation.append(float(utilisation))
            self.peak_memory_mb = max(self.peak_memory_mb, float(memory))

    def mean_utilisation(self) -> float:
        return statistics.fmean(self.utilisation) if self.utilisation else float("nan")

    def summary(self) -> dict[str, float]:
        return {"peak_memory_mb": self.peak_memory_mb, "mean_utilisation_percent": self.mean_utilisation()}


class RssSampler(threading.Thread):
    """The highest VmRSS of some processes while a measurement runs (sampled every 0.2 s)."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peaks = pids, {name: 0.0 for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], rss_mb(pid))


def wait_embedded(connection: psycopg.Connection, table: str, rows: int, timeout: float = 3600,
                  poll_seconds: float = 0.1) -> None:
    """Poll cheaply (the status view counts whole tables: too heavy to poll while measuring), and
    not too often: on 2 cores, polling every 20 ms took CPU from the worker being measured."""
    watch_id, storage = connection.execute(
        "SELECT w.id, wm.storage_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id "
        "WHERE w.table_name = %s AND wm.is_default", (table,)).fetchone()  # type: ignore[misc]
    query = (f"SELECT (SELECT count(*) FROM imgembed.{storage}) + (SELECT count(*) FROM imgembed.job "  # noqa: S608
             "WHERE watch_id = %s AND status = 'failed')")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connection.execute(query, (watch_id,)).fetchone()[0] >= rows:  # type: ignore[index]
            return
        time.sleep(poll_seconds)
    raise TimeoutError(f"{table}: {rows} rows not embedded within {timeout}s")


def end_to_end(connection: psycopg.Connection, rows: int, as_bytes: bool, round_number: int, photo_dir: Path,
               poll_seconds: float = 0.1) -> float:
    """(2) rows inserted (real JPEGs) until the last vector is committed, images/s. The inserter
    does what an application loading images should (README, Images): a binary COPY, and image
    bytes stored without PostgreSQL's compression attempt (JPEGs do not compress). On 2 cores,
    the text COPY into a default bytea column took 3.5 s of the run's CPU instead of 1 s."""
    photos = sorted(photo_dir.glob("*.JPEG"))
    table = f"bench_e2e_{'bytes' if as_bytes else 'paths'}_{round_number}"
    column = "bytea" if as_bytes else "text"
    connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, image {column})")
    if as_bytes:
        connection.execute(f"ALTER TABLE {table} ALTER COLUMN image SET STORAGE EXTERNAL")
    connection.execute(f"SELECT imgembed.watch('{table}', 'image')")
    payload = [photo.read_bytes() if as_bytes else str(photo) for photo in photos]
    started = time.perf_counter()
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} (id, image) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["bigint", column])
        for i in range(rows):
            copy.write_row((i, payload[i % len(payload)]))
    wait_embedded(connection, f"public.{table}", rows, poll_seconds=poll_seconds)
    return rows / (time.perf_counter() - started)


def insert_latency(connection: psycopg.Connection, inserts: int, photo_dir: Path) -> tuple[float, float]:
    """(3) one INSERT's commit to its vector's commit, at idle: p50 and p95 in ms."""
    photo = sorted(photo_dir.glob("*.JPEG"))[0].read_bytes()
    connection.execute("CREATE TABLE bench_latency (id bigint PRIMARY KEY, image bytea)")
    connection.execute("SELECT imgembed.watch('bench_latency', 'image')")
    storage = connection.execute("SELECT imgembed.storage_table('bench_latency')").fetchone()[0]  # type: ignore[index]
    latencies = []
    for i in range(inserts):
        connection.execute("INSERT INTO bench_latency VALUES (%s, %s)", (i, photo))  # autocommit: committed now
        committed = time.perf_counter()
        while not connection.execute(f"SELECT 1 FROM imgembed.{storage} WHERE id = %s", (i,)).fetchone():
            time.sleep(0.002)
        latencies.append((time.perf_counter() - committed) * 1000)
        time.sleep(0.3)  # idle between inserts
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))


def trigger_overhead(connection: psycopg.Connection, rows: int, repeats: int) -> tuple[float, float]:
    """(4) rows/s of one multi-row INSERT into an unwatched and a watched table."""
    def insert_rate(watched: bool, attempt: int) -> float:
        table = f"bench_trigger_{'w' if watched else 'u'}_{attempt}"
        connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, path text)")
        if watched:
            connection.execute(f"SELECT imgembed.watch('{table}', 'path')")
        started = time.perf_counter()
        connection.execute(f"INSERT INTO {table} SELECT g, '/images/' || g || '.jpg' FROM generate_series(1, %s) g", (rows,))
        rate = rows / (time.perf_counter() - started)
        if watched:
            connection.execute(f"SELECT imgembed.unwatch('{table}')")
        connection.execute(f"DROP TABLE {table}")
        return rate

    unwatched = statistics.median(insert_rate(False, i) for i in range(repeats))
    watched = statistics.median(insert_rate(True, i) for i in range(repeats))
    return unwatched, watched


def search_figures(connection: psycopg.Connection, size: BenchSize, results: Results) -> None:
    """(5) similar() at N stored vectors: latency and recall@10 for several ef_search values."""
    dim, count = size.search_dim, size.search_vectors
    model_name = "bench-search"
    connection.execute("SELECT imgembed.register_model(%s, 'bench', NULL, %s)", (model_name, dim))
    connection.execute("CREATE TABLE bench_search (id bigint PRIMARY KEY, path text, category text)")
    connection.execute("INSERT INTO bench_search SELECT g, NULL, CASE WHEN g %% 100 = 0 THEN 'rare' ELSE 'common' END "
                       "FROM generate_series(0, %s - 1) g", (count,))
    connection.execute("SELECT imgembed.watch('bench_search', 'path', model => %s)", (model_name,))
    storage = connection.execute("SELECT imgembed.storage_table('bench_search')").fetchone()[0]  # type: ignore[index]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, dim))
    half = count // 2
    vectors = np.vstack([rng.normal(size=(count - half, dim)),
                         centres[rng.integers(0, 50, half)] + 0.5 * rng.normal(size=(half, dim))]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    connection.execute(f"DROP INDEX imgembed.{storage}_hnsw")
    load_started = time.perf_counter()
    with connection.cursor() as cursor, cursor.copy(
        f"COPY imgembed.{storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "vector", "bigint"])
        for i in range(count):
            copy.write_row((i, vectors[i], 0))
    connection.execute("SET maintenance_work_mem = '1GB'")
    build_started = time.perf_counter()
    connection.execute("SELECT imgembed.rebuild_index('bench_search')")
    build_seconds = time.perf_counter() - build_started
    connection.execute(f"ANALYZE imgembed.{storage}")
    results.add("search_load", {"vectors": count, "dim": dim, "copy_s": build_started - load_started, "hnsw_build_s": build_seconds},
                f"- loaded {count} x {dim}-dim vectors in {build_started - load_started:.1f} s; "
                f"HNSW build (halfvec, m=16, ef_construction=64) {build_seconds:.1f} s")
    # Half the queries from the random half, half from the clustered half: recall differs a lot.
    queries = (rng.choice(count - half, size.search_queries // 2, replace=False).tolist()
               + (count - half + rng.choice(half, size.search_queries - size.search_queries // 2, replace=False)).tolist())
    clustered = [key >= count - half for key in queries]

    def run(ef: int | None, exact: bool, filter_json: str | None) -> tuple[list[list[int]], list[float]]:
        hits, timings = [], []
        for key in queries:
            started = time.perf_counter()
            rows = connection.execute(
                "SELECT id FROM imgembed.similar('bench_search', %s::bigint, 10, ef_search => %s, exact => %s, filter => %s)",
                (key, ef, exact, filter_json)).fetchall()
            timings.append((time.perf_counter() - started) * 1000)
            hits.append([row[0] for row in rows])
        return hits, timings

    for label, filter_json in (("all rows", None), ("filter matching 1%", json.dumps({"category": "rare"}))):
        truth, exact_ms = run(None, True, filter_json)
        results.add(f"search_exact_{label}", {"p50_ms": np.percentile(exact_ms, 50)},
                    f"- similar(), {label}, exact scan: p50 {np.percentile(exact_ms, 50):.1f} ms, "
                    f"p95 {np.percentile(exact_ms, 95):.1f} ms")
        for ef in (40, 100, 200, 400):
            run(ef, False, filter_json)  # warm-up: the index pages these queries touch come into memory
            approx, timings = run(ef, False, filter_json)
            recalls = [len(set(a) & set(t)) / max(1, len(t)) for a, t in zip(approx, truth)]
            recall = float(np.mean(recalls))
            recall_clustered = float(np.mean([r for r, c in zip(recalls, clustered) if c]))
            recall_random = float(np.mean([r for r, c in zip(recalls, clustered) if not c]))
            full = np.mean([len(a) == 10 for a in approx])
            results.add(f"search_{label}_ef{ef}",
                        {"p50_ms": float(np.percentile(timings, 50)), "p95_ms": float(np.percentile(timings, 95)),
                         "recall_at_10": recall, "recall_clustered": recall_clustered, "recall_random": recall_random,
                         "full_k": float(full)},
                        f"- similar(), {label}, ef_search={ef}, warm: p50 {np.percentile(timings, 50):.1f} ms, "
                        f"p95 {np.percentile(timings, 95):.1f} ms, recall@10 {recall:.3f} (clustered-set queries "
                        f"{recall_clustered:.3f}, random-sphere queries {recall_random:.3f}), full k in {full:.0%} of queries")


FIGURES = (1, 2, 3, 4, 5, 6)


def device_settings(settings: Settings, device: str) -> Settings:
    """On a GPU the model outruns one decode thread per core only with large claims, several of
    them waiting to merge, and a deep enough queue (see README, Speed)."""
    if not device.startswith("cuda"):
        return settings.with_overrides(device=device)
    return settings.with_overrides(device=device, batch_size=max(settings.batch_size, 256),
                                   worker_threads=max(settings.worker_threads, 4),
                                   decode_threads=max(settings.decode_threads, os.cpu_count() or 1),
                                   max_in_flight=max(settings.max_in_flight, 4096))


def run_bench(settings: Settings, *, size: BenchSize, model: str, out: Path, device: str = "cpu",
              figures: tuple[int, ...] = FIGURES, photos: Path = PHOTOS) -> Results:
    if set(figures) & {2, 3} and not any(photos.glob("*.JPEG")):
        raise FileNotFoundError(f"no *.JPEG photos in {photos} (give another folder with --photos)")
    results = Results()
    bench_dir = settings.data_dir / "bench"
    shutil.rmtree(bench_dir, ignore_errors=True)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = device_settings(settings, device)
    on_gpu = device.startswith("cuda")
    e2e_rows = size.e2e_rows_gpu if on_gpu else size.e2e_rows
    chosen = "" if figures == FIGURES else f" --figures {','.join(map(str, figures))}"
    results.lines += ["# imgembed benchmark", "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
                      f"{git_revision()} with `imgembed bench{' --smoke' if size == SMOKE else ''} --model {model}"
                      f"{' --device ' + device if on_gpu else ''}{chosen}`.", ""]
    results.lines += machine_description()
    results.lines += [f"- model: {model} (random weights are fine for speed), {settings.batch_size} jobs per claim, "
                      f"{settings.worker_threads} task threads, {settings.decode_threads} decode threads, "
                      f"device {device}, median of {size.repeats} runs", "", "## Figures", ""]
    raw = single_ms = float("nan")
    raw_model: RawModel | None = None
    batch = raw_images = 0
    if 1 in figures:
        raw_model = RawModel(model, device)
        batch = forward_batch_size(raw_model.model, "image", settings)  # as a worker
        raw_images = max(size.raw_images, 8 * batch if on_gpu else 0)
        raw = median_of(size.repeats, lambda: raw_model.images_per_s(raw_images, batch))  # type: ignore[union-attr]
        results.add("raw_images_per_s", raw, f"- (1) raw model throughput, encode_image on preprocessed tensors, "
                    f"{batch} images per pass: {raw:.1f} images/s")
        single_ms = 1000 / median_of(size.repeats, lambda: raw_model.images_per_s(4, 1))  # type: ignore[union-attr]
        results.add("single_image_forward_ms", single_ms, f"- one image alone through encode_image: {single_ms:.0f} ms")
    if not set(figures) & {2, 3, 4, 5, 6}:
        return write_results(results, out)

    stack_settings = settings.with_overrides(model=model, data_dir=bench_dir)
    with local_stack(stack_settings, durable=False) as stack, connect(stack.settings.database_url or "") as connection:
        register_model(connection, model, make_default=True)
        connection.execute("SELECT imgembed.use_model('imgembed.image', %s, force => true)", (model,))
        wait_ready(stack, photos)
        sampler = RssSampler({role: stack.children[role].pid for role in ("worker", "dispatch")})
        sampler.start()
        gpu = GpuSampler() if on_gpu else None
        if 2 in figures:
            for as_bytes in (True, False):
                kind = "bytea" if as_bytes else "file paths"
                rates, ratios = [], []
                for attempt in range(size.repeats):
                    raw_before = raw_model.images_per_s(raw_images, batch) if raw_model else float("nan")
                    rates.append(end_to_end(connection, e2e_rows, as_bytes, attempt, photos, 0.01 if on_gpu else 0.1))
                    ratios.append(rates[-1] / raw_before)
                rate, ratio = statistics.median(rates), statistics.median(ratios)
                results.add(f"e2e_{kind}", {"images_per_s": rate, "ratio_to_raw": ratio},
                            f"- (2) end to end, {e2e_rows} rows of real JPEGs as {kind}, insert to last vector "
                            f"committed: {rate:.1f} images/s"
                            + (f" = {ratio:.0%} of (1) measured just before each run (median of {size.repeats} "
                               f"ratios; {rate / raw:.0%} of the (1) above)" if raw_model else ""))
        if gpu is not None:
            gpu.stop.set()
            results.add("gpu", gpu.summary(), f"- (7) during (2): GPU memory used at most {gpu.peak_memory_mb:.0f} MB, "
                        f"GPU utilisation {gpu.mean_utilisation():.0f}% on average (nvidia-smi every 0.2 s)")
        if 3 in figures:
            p50, p95 = insert_latency(connection, size.latency_inserts, photos)
            results.add("latency_ms", {"p50": p50, "p95": p95},
                        f"- (3) one INSERT's commit to its vector's commit, at idle: p50 {p50:.0f} ms, p95 {p95:.0f} ms"
                        + (f" (= single-image forward + {p50 - single_ms:.0f} ms at p50)" if single_ms == single_ms else ""))
        sampler.stop.set()
        worker_rss, dispatcher_rss = sampler.peaks["worker"], sampler.peaks["dispatch"]
        worker_hwm = rss_mb(stack.children["worker"].pid, "VmHWM")
        if 4 in figures:
            unwatched, watched = trigger_overhead(connection, size.trigger_rows, size.repeats)
            results.add("trigger_rows_per_s", {"unwatched": unwatched, "watched": watched},
                        f"- (4) {size.trigger_rows} rows in one INSERT: unwatched {unwatched:,.0f} rows/s, watched "
                        f"{watched:,.0f} rows/s ({watched / unwatched:.0%}), one NOTIFY per statement")
        if 5 in figures:
            search_figures(connection, size, results)
        if 6 in figures and set(figures) & {2, 3}:
            results.add("rss_mb", {"worker": worker_rss, "dispatcher": dispatcher_rss, "worker_since_start": worker_hwm},
                        f"- (6) peak RSS during (2)-(3): worker {worker_rss:.0f} MB, dispatcher {dispatcher_rss:.0f} MB "
                        f"(worker's high-water mark since start, model loading included: {worker_hwm:.0f} MB)")
    return write_results(results, out)


def write_results(results: Results, out: Path) -> Results:
    results.lines += ["", "```json", json.dumps(results.figures, indent=2, default=float), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(results.lines))
    print(f"\nwritten to {out}")
    return results


def wait_ready(stack: Stack, photo_dir: Path, timeout: float = 300) -> None:
    """Wait until the worker has loaded its model and answers (one tiny job round trip)."""
    with connect(stack.settings.database_url or "") as connection:
        connection.execute("CREATE TABLE bench_warmup (id bigint PRIMARY KEY, image bytea)")
        connection.execute("SELECT imgembed.watch('bench_warmup', 'image')")
        connection.execute("INSERT INTO bench_warmup VALUES (1, %s)", (sorted(photo_dir.glob("*.JPEG"))[0].read_bytes(),))
        wait_embedded(connection, "public.bench_warmup", 1, timeout)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
