"""Prometheus metrics of a worker or a dispatcher process, served on IMGEMBED_METRICS_PORT (off by
default). Each process has a registry and a port of its own: several workers on one host each take
their own port. Metric names are listed in METRIC_NAMES (the dashboard's panels use only these)."""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from imgembed.settings import Settings, SettingsError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# Forward passes and claims last from milliseconds (a small model, a GPU) to minutes (ViT-L-14 on a CPU).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

METRIC_NAMES = (
    "imgembed_rows_embedded_total", "imgembed_rows_failed_total", "imgembed_rows_reused_total",
    "imgembed_claims_total", "imgembed_forward_pass_images", "imgembed_forward_pass_seconds",
    "imgembed_read_decode_seconds", "imgembed_write_seconds", "imgembed_model_loaded",
    "imgembed_model_load_seconds", "imgembed_process_resident_bytes", "imgembed_gpu_memory_bytes",
    "imgembed_gpu_utilisation_ratio",
    "imgembed_backlog_jobs", "imgembed_in_flight_jobs", "imgembed_oldest_queued_seconds",
    "imgembed_claims_dispatched_total", "imgembed_leases_recovered_total",
)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise SettingsError("IMGEMBED_METRICS_PORT is set but prometheus_client is not installed: "
                            "pip install 'imgembed[metrics]'") from error
    return prometheus_client


def serve(settings: Settings, role: str) -> CollectorRegistry | None:
    """A registry for this process, served over HTTP on the metrics port; None when metrics are off."""
    if not settings.metrics_port:
        return None
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry()
    try:
        prometheus.start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    except OSError as error:
        raise SettingsError(f"IMGEMBED_METRICS_PORT={settings.metrics_port}: cannot listen there ({error}); "
                            "give each worker and dispatcher on a host its own port") from error
    log.info("%s metrics on http://%s:%d/metrics", role, settings.metrics_address, settings.metrics_port)
    return registry


def _resident_bytes() -> float:
    with open("/proc/self/statm") as handle:
        return float(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class WorkerMetrics:
    """What a worker counts: rows, claims, forward passes, the time each step takes, its models."""

    def __init__(self, registry: CollectorRegistry) -> None:
        prometheus = _prometheus()
        counter, histogram, gauge = prometheus.Counter, prometheus.Histogram, prometheus.Gauge
        self.rows_embedded = counter("imgembed_rows_embedded", "Rows given a vector", ["table", "model"],
                                     registry=registry)
        self.rows_failed = counter("imgembed_rows_failed", "Rows whose image failed, by the class of the reason "
                                   "(retried later, or failed for good)", ["table", "model", "reason"], registry=registry)
        self.rows_reused = counter("imgembed_rows_reused", "Rows given a vector the model had made from the same bytes",
                                   ["model"], registry=registry)
        self.claims = counter("imgembed_claims", "Claims (batches of jobs) run", ["model"], registry=registry)
        self.pass_images = histogram("imgembed_forward_pass_images", "Inputs in one forward pass",
                                     ["model", "tower"], buckets=IMAGES_BUCKETS, registry=registry)
        self.pass_seconds = histogram("imgembed_forward_pass_seconds", "Duration of one forward pass",
                                      ["model", "tower"], buckets=SECONDS_BUCKETS, registry=registry)
        self.read_decode_seconds = histogram("imgembed_read_decode_seconds", "Reading and decoding a claim's images",
                                             ["model"], buckets=SECONDS_BUCKETS, registry=registry)
        self.write_seconds = histogram("imgembed_write_seconds", "Writing a claim's vectors and failures",
                                       ["model"], buckets=SECONDS_BUCKETS, registry=registry)
        self.model_loaded = gauge("imgembed_model_loaded", "1 when the model's tower is loaded, 0 while it cannot be",
                                  ["model", "tower"], registry=registry)
        self.model_load_seconds = gauge("imgembed_model_load_seconds", "How long the tower took to load",
                                        ["model", "tower"], registry=registry)
        gauge("imgembed_process_resident_bytes", "Resident memory of the process",
              registry=registry).set_function(_resident_bytes)
        self._registry = registry
        self._gpu_watched = False

    def watch_gpu(self, memory_bytes: Callable[[], float], utilisation: Callable[[], float]) -> None:
        """GPU memory and utilisation gauges (read when scraped), once a model runs on CUDA."""
        if self._gpu_watched:
            return
        self._gpu_watched = True
        gauge, registry = _prometheus().Gauge, self._registry
        gauge("imgembed_gpu_memory_bytes", "Device memory held by PyTorch", registry=registry).set_function(memory_bytes)
        gauge("imgembed_gpu_utilisation_ratio", "GPU utilisation (NVML), 0 to 1", registry=registry).set_function(
            utilisation)

    def forward_pass(self, model: str, tower: str, inputs: int, seconds: float) -> None:
        self.pass_images.labels(model, tower).observe(inputs)
        self.pass_seconds.labels(model, tower).observe(seconds)

    def model_state(self, model: str, tower: str, loaded: bool, load_seconds: float | None = None) -> None:
        self.model_loaded.labels(model, tower).set(1 if loaded else 0)
        if load_seconds is not None:
            self.model_load_seconds.labels(model, tower).set(load_seconds)

    def claim(self, model: str, embedded_tables: Iterable[str], failures: Iterable[tuple[str, str]], reused: int,
              read_decode_seconds: float, write_seconds: float) -> None:
        """One claim's outcome: the table of each row embedded, (table, error) of each failure."""
        self.claims.labels(model).inc()
        for table, count in Tally(embedded_tables).items():
            self.rows_embedded.labels(table, model).inc(count)
        for (table, reason), count in Tally((table, error.split(":", 1)[0]) for table, error in failures).items():
            self.rows_failed.labels(table, model, reason).inc(count)
        if reused:
            self.rows_reused.labels(model).inc(reused)
        self.read_decode_seconds.labels(model).observe(read_decode_seconds)
        self.write_seconds.labels(model).observe(write_seconds)


class DispatcherMetrics:
    """What a dispatcher sees: the backlog per table and model, claims sent, leases recovered."""

    def __init__(self, registry: CollectorRegistry) -> None:
        prometheus = _prometheus()
        self.backlog = prometheus.Gauge("imgembed_backlog_jobs", "Rows waiting for a worker (queued, not in flight)",
                                        ["table", "model"], registry=registry)
        self.in_flight = prometheus.Gauge("imgembed_in_flight_jobs", "Jobs claimed by a worker, not finished yet",
                                          ["table", "model"], registry=registry)
        self.oldest = prometheus.Gauge("imgembed_oldest_queued_seconds", "How long the oldest queued row has waited",
                                       ["table", "model"], registry=registry)
        self.claims = prometheus.Counter("imgembed_claims_dispatched", "Claims sent to the workers", ["model"],
                                         registry=registry)
        self.recovered = prometheus.Counter("imgembed_leases_recovered", "Jobs handed out again after their lease "
                                            "expired (a worker died or stalled)", registry=registry)
        self._known: set[tuple[str, str]] = set()

    def backlog_rows(self, rows: Iterable[tuple[str, str, int, int, float | None]]) -> None:
        """Rows of imgembed.backlog(): (table, model, queued, in flight, oldest queued seconds)."""
        seen = set()
        for table, model, queued, in_flight, oldest in rows:
            seen.add((table, model))
            self.backlog.labels(table, model).set(queued)
            self.in_flight.labels(table, model).set(in_flight)
            self.oldest.labels(table, model).set(oldest or 0.0)
        for gone in self._known - seen:  # unwatched tables, dropped models
            for gauge in (self.backlog, self.in_flight, self.oldest):
                gauge.remove(*gone)
        self._known = seen
