"""``imgembed bench``: measure the system on the embedded services and write docs/results/RESULTS.md.

Every figure is the median of several runs. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import psycopg

from imgembed.bench.end_to_end import (
    end_to_end_figures,
    insert_latency,
    trigger_overhead,
    wait_ready,
)
from imgembed.bench.machine import (
    database_description,
    device_settings,
    git_revision,
    machine_description,
)
from imgembed.bench.peak_memory import GpuSampler, RssSampler, memory_mb
from imgembed.bench.raw_model import RawModel
from imgembed.bench.repeats import repeated_images_figure
from imgembed.bench.results import (
    FIGURES,
    SMOKE,
    BenchSize,
    Results,
    median_of,
    write_results,
)
from imgembed.bench.runtimes import runtime_figures
from imgembed.bench.search_speed import search_figures
from imgembed.db import connect
from imgembed.local.stack import Stack, local_stack
from imgembed.models.names import parse_model_spec
from imgembed.models.registry import register_model
from imgembed.settings import Settings
from imgembed.worker.onnx.model import OnnxModel


def _header(results: Results, settings: Settings, size: BenchSize, model: str, device: str,
            figures: tuple[int, ...], photos_note: str) -> None:
    chosen = "" if figures == FIGURES else f" --figures {','.join(map(str, figures))}"
    on_gpu = device.startswith("cuda")
    results.lines += ["# imgembed benchmark", "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
                      f"{git_revision()} with `imgembed bench{' --smoke' if size == SMOKE else ''} --model {model}"
                      f"{' --device ' + device if on_gpu else ''}{chosen}`.", ""]
    results.lines += machine_description()
    weights = "random weights, fine for speed" if parse_model_spec(model).random_weights else "trained weights"
    results.lines += [f"- model: {model} ({weights}), {settings.batch_size} jobs per claim, "
                      f"{settings.worker_threads} task threads, {settings.decode_threads} decode threads, "
                      f"device {device}, median of {size.repeats} runs", f"- photos: {photos_note}", "",
                      "## Figures", ""]


def _model_alone(results: Results, settings: Settings, size: BenchSize, model: str) -> tuple[RawModel, float]:
    """(1): the model's throughput and one image's forward pass; returns the model and that pass in ms."""
    raw_model = RawModel(model, settings, size)
    raw = median_of(size.repeats, raw_model.throughput)
    runtime = raw_model.model.runtime if isinstance(raw_model.model, OnnxModel) else "PyTorch"
    results.add("raw_images_per_s", raw, f"- (1) raw model throughput on {runtime} (the worker's runtime), the image "
                f"tower on preprocessed pixels, {raw_model.batch} images per pass: {raw:.1f} images/s")
    single_ms = 1000 / median_of(size.repeats, lambda: raw_model.images_per_s(4, 1))
    results.add("single_image_forward_ms", single_ms, f"- one image alone through encode_image: {single_ms:.0f} ms")
    return raw_model, single_ms


def _memory_figure(results: Results, sampler: RssSampler, stack: Stack) -> None:
    """(6): what the worker and the dispatcher held while (2) and (3) ran."""
    worker_rss, dispatcher_rss = sampler.peaks["worker"], sampler.peaks["dispatch"]
    worker_anonymous = sampler.anonymous_peaks["worker"]
    (worker_hwm,) = memory_mb(stack.children["worker"].pid, "VmHWM")
    results.add("rss_mb", {"worker": worker_rss, "dispatcher": dispatcher_rss, "worker_since_start": worker_hwm,
                           "worker_anonymous": worker_anonymous},
                f"- (6) peak RSS during (2)-(3): worker {worker_rss:.0f} MB, dispatcher {dispatcher_rss:.0f} MB "
                f"(worker's high-water mark since start, model loading included: {worker_hwm:.0f} MB; "
                f"the worker's own memory at most {worker_anonymous:.0f} MB, the rest pages mapped from files: "
                "shared libraries, and a memory-mapped checkpoint's weights)")


def _pipeline_figures(results: Results, connection: psycopg.Connection, stack: Stack, *, size: BenchSize,
                      figures: tuple[int, ...], raw_model: RawModel | None, single_ms: float, photos: Path) -> None:
    """(2), (3) and (6) with the worker's and dispatcher's memory sampled; (7) on a GPU."""
    settings = stack.settings
    on_gpu = settings.device.startswith("cuda")
    sampler = RssSampler({role: stack.children[role].pid for role in ("worker", "dispatch")})
    sampler.start()
    gpu = GpuSampler() if on_gpu else None
    if 2 in figures:
        rows = size.e2e_rows_gpu if on_gpu else size.e2e_rows
        end_to_end_figures(connection, results, size, settings, raw_model, photos, rows, settings.data_dir / "copies")
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
    if 6 in figures and set(figures) & {2, 3}:
        _memory_figure(results, sampler, stack)


def run_bench(settings: Settings, *, size: BenchSize, model: str, out: Path, photos: Path, photos_note: str,
              device: str = "cpu", figures: tuple[int, ...] = FIGURES) -> Results:
    """Measure ``figures`` (numbered as in docs/results/RESULTS.md) and write them to ``out``."""
    import torch

    results = Results()
    bench_dir = settings.data_dir / "bench"
    shutil.rmtree(bench_dir, ignore_errors=True)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = device_settings(settings, device)
    _header(results, settings, size, model, device, figures, photos_note)
    raw_model, single_ms = _model_alone(results, settings, size, model) if 1 in figures else (None, float("nan"))
    if 8 in figures:
        runtime_figures(results, settings, size, model, photos)
    if not set(figures) & {2, 3, 4, 5, 6, 9}:
        return write_results(results, out)

    stack_settings = settings.with_overrides(model=model, data_dir=bench_dir)
    with local_stack(stack_settings, durable=False) as stack, connect(stack.settings.database_url or "") as connection:
        database = database_description(connection)
        results.add("database", database, f"- database: PostgreSQL {database['postgres']}, pgvector "
                    f"{database['pgvector']}, shared_buffers {database['shared_buffers']}")
        register_model(connection, model, make_default=True, model_dir=settings.models_path)
        connection.execute("SELECT imgembed.use_model('imgembed.image', %s, force => true)", (model,))
        wait_ready(stack, photos)
        _pipeline_figures(results, connection, stack, size=size, figures=figures, raw_model=raw_model,
                          single_ms=single_ms, photos=photos)
        if 9 in figures:
            repeated_images_figure(connection, results, size, photos)
        if 4 in figures:
            unwatched, watched = trigger_overhead(connection, size.trigger_rows, size.repeats)
            results.add("trigger_rows_per_s", {"unwatched": unwatched, "watched": watched},
                        f"- (4) {size.trigger_rows} rows in one INSERT: unwatched {unwatched:,.0f} rows/s, watched "
                        f"{watched:,.0f} rows/s ({watched / unwatched:.0%}), one NOTIFY per statement")
        if 5 in figures:
            search_figures(connection, size, results)
    return write_results(results, out)
