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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psycopg
import torch

from worker.db import NOTIFY_CHANNEL, connect
from worker.embedding import load_model
from worker.images import ImageError
from worker.model_spec import parse_model_spec
from worker.models import register_model
from worker.pipeline import forward_batch_size, preprocess_bytes
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
    raw_seconds: float = 8.0  # each raw measurement runs at least this long (a fast model needs many passes)
    raw_seconds_gpu: float = 3.0  # a GPU's speed drifts less, and (2) measures it 12 times
    repeats: int = 3


SMOKE = BenchSize(e2e_rows=24, e2e_rows_gpu=24, latency_inserts=3, trigger_rows=500, search_vectors=2000, search_dim=64,
                  search_queries=5, raw_images=16, raw_seconds=0.2, raw_seconds_gpu=0.2,
                  repeats=1)


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

    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, GPU: {gpu}",
        f"- python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"pgvector-python {version('pgvector')}",
    ]


def database_description(connection: psycopg.Connection) -> dict[str, str]:
    """The server's versions, and its buffer cache: search latency depends on whether the index fits."""
    row = connection.execute("SELECT current_setting('server_version'), "
                             "(SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                             "current_setting('shared_buffers')").fetchone()
    assert row is not None
    return dict(zip(("postgres", "pgvector", "shared_buffers"), row))


class RawModel:
    """(1): the model alone in the bench process, timed on already-preprocessed tensors at the
    batch size a worker would pick. Kept loaded, so (2) can measure it again around each run: on a
    shared machine the CPU's speed drifts over minutes, and a ratio of two figures taken minutes
    apart would measure the drift."""

    def __init__(self, model_name: str, settings: Settings, size: BenchSize) -> None:
        self.model = load_model(parse_model_spec(model_name), settings.device, tower="image")
        self.batch = forward_batch_size(self.model, "image", settings)
        on_gpu = self.model.device.type == "cuda"
        self.images = max(size.raw_images, 8 * self.batch if on_gpu else 0)
        self.seconds = size.raw_seconds_gpu if on_gpu else size.raw_seconds

    def throughput(self) -> float:
        """(1) once: images/s at the worker's batch size."""
        return self.images_per_s(self.images, self.batch, self.seconds)

    def images_per_s(self, images: int, batch_size: int, seconds: float = 0.0) -> float:
        """At least ``images`` images, and passes for at least ``seconds``."""
        pixels = torch.randn(batch_size, 3, self.model.input_size, self.model.input_size)
        self.model.embed_pixels(pixels)  # warm-up
        started = time.perf_counter()
        done = 0
        while done < images or time.perf_counter() - started < seconds:
            self.model.embed_pixels(pixels)  # returns the vectors on the CPU: the device has finished
            done += batch_size
        return done / (time.perf_counter() - started)

    def decode_images_per_s(self, photos: list[bytes], settings: Settings) -> float:
        """JPEG bytes to model-ready tensors alone, as the worker does it (Pillow in
        IMGEMBED_DECODE_THREADS threads): the other limit of (2), besides the model."""
        with ThreadPoolExecutor(settings.decode_threads) as decoders:
            list(decoders.map(lambda data: preprocess_bytes(data, self.model, settings), photos[:32]))  # warm-up
            started = time.perf_counter()
            prepared = list(decoders.map(lambda data: preprocess_bytes(data, self.model, settings), photos))
            seconds = time.perf_counter() - started
        failed = [result for result in prepared if isinstance(result, ImageError)]
        if failed:
            raise RuntimeError(f"{len(failed)} bench photos did not decode: {failed[0]}")
        return len(photos) / seconds


def memory_mb(pid: int, *field_names: str) -> tuple[float, ...]:
    """Memory lines of /proc/PID/status, in MB, read at once: resident memory (VmRSS), its
    high-water mark since the process started (VmHWM), the process's own part (RssAnon)..."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, amount = line.partition(":")
        if name in field_names:
            values[name] = int(amount.split()[0]) / 1024  # "123456 kB"
    return tuple(values.get(name, float("nan")) for name in field_names)


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
    """The highest VmRSS of some processes while a measurement runs (sampled every 0.2 s), and
    the highest part of it that is the process's own memory (RssAnon). The rest is pages mapped
    from files (RssFile), shared with other processes and dropped first under memory pressure:
    the CUDA build's libraries (330-560 MB of a CPU worker) and a memory-mapped checkpoint."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peaks = {name: 0.0 for name in pids}
        self.anonymous_peaks = {name: 0.0 for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, pid in self.pids.items():
                resident, anonymous = memory_mb(pid, "VmRSS", "RssAnon")
                self.peaks[name] = max(self.peaks[name], resident)
                self.anonymous_peaks[name] = max(self.anonymous_peaks[name], anonymous)


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


def end_to_end(connection: psycopg.Connection, rows: int, as_bytes: bool, round_number: int,
               photo_dir: Path) -> tuple[float, float]:
    """(2) rows inserted (real JPEGs) until the last vector is committed: images/s, and the seconds
    the insert itself took (one COPY: no row is visible to the pipeline before it commits). The inserter
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
    inserted = time.perf_counter()
    wait_embedded(connection, f"public.{table}", rows)
    return rows / (time.perf_counter() - started), inserted - started


def end_to_end_figures(connection: psycopg.Connection, results: Results, size: BenchSize, settings: Settings,
                       raw_model: RawModel | None, photos: Path, rows: int) -> None:
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
            rate, inserted = end_to_end(connection, rows, as_bytes, attempt, photos)
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
    weights = "random weights, fine for speed" if parse_model_spec(model).random_weights else "trained weights"
    results.lines += [f"- model: {model} ({weights}), {settings.batch_size} jobs per claim, "
                      f"{settings.worker_threads} task threads, {settings.decode_threads} decode threads, "
                      f"device {device}, median of {size.repeats} runs", "", "## Figures", ""]
    raw = single_ms = float("nan")
    raw_model: RawModel | None = None
    if 1 in figures:
        raw_model = RawModel(model, settings, size)
        raw = median_of(size.repeats, raw_model.throughput)
        results.add("raw_images_per_s", raw, f"- (1) raw model throughput, encode_image on preprocessed tensors, "
                    f"{raw_model.batch} images per pass: {raw:.1f} images/s")
        single_ms = 1000 / median_of(size.repeats, lambda: raw_model.images_per_s(4, 1))  # type: ignore[union-attr]
        results.add("single_image_forward_ms", single_ms, f"- one image alone through encode_image: {single_ms:.0f} ms")
    if not set(figures) & {2, 3, 4, 5, 6}:
        return write_results(results, out)

    stack_settings = settings.with_overrides(model=model, data_dir=bench_dir)
    with local_stack(stack_settings, durable=False) as stack, connect(stack.settings.database_url or "") as connection:
        database = database_description(connection)
        results.add("database", database, f"- database: PostgreSQL {database['postgres']}, pgvector "
                    f"{database['pgvector']}, shared_buffers {database['shared_buffers']}")
        register_model(connection, model, make_default=True)
        connection.execute("SELECT imgembed.use_model('imgembed.image', %s, force => true)", (model,))
        wait_ready(stack, photos)
        sampler = RssSampler({role: stack.children[role].pid for role in ("worker", "dispatch")})
        sampler.start()
        gpu = GpuSampler() if on_gpu else None
        if 2 in figures:
            end_to_end_figures(connection, results, size, settings, raw_model, photos, e2e_rows)
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
        worker_anonymous = sampler.anonymous_peaks["worker"]
        (worker_hwm,) = memory_mb(stack.children["worker"].pid, "VmHWM")
        if 4 in figures:
            unwatched, watched = trigger_overhead(connection, size.trigger_rows, size.repeats)
            results.add("trigger_rows_per_s", {"unwatched": unwatched, "watched": watched},
                        f"- (4) {size.trigger_rows} rows in one INSERT: unwatched {unwatched:,.0f} rows/s, watched "
                        f"{watched:,.0f} rows/s ({watched / unwatched:.0%}), one NOTIFY per statement")
        if 5 in figures:
            from worker.bench_search import search_figures

            search_figures(connection, size, results)
        if 6 in figures and set(figures) & {2, 3}:
            results.add("rss_mb", {"worker": worker_rss, "dispatcher": dispatcher_rss, "worker_since_start": worker_hwm,
                                   "worker_anonymous": worker_anonymous},
                        f"- (6) peak RSS during (2)-(3): worker {worker_rss:.0f} MB, dispatcher {dispatcher_rss:.0f} MB "
                        f"(worker's high-water mark since start, model loading included: {worker_hwm:.0f} MB; "
                        f"the worker's own memory at most {worker_anonymous:.0f} MB, the rest pages mapped from files: "
                        "shared libraries, and a memory-mapped checkpoint's weights)")
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
