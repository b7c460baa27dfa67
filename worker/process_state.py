"""What a worker process keeps between tasks: its settings, a database connection per task
thread, the models it has loaded, their forward-pass threads and the decode threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import psycopg

from imgembed import db
from imgembed.images.decode import use_pixel_cap
from imgembed.models.names import ModelSpec, file_sha256, parse_model_spec
from imgembed.models.registry import registered_sha256
from imgembed.models.store import stored_checkpoint
from imgembed.settings import Settings, require_database_url
from imgembed.worker.batcher import ForwardBatcher, tune_max_batch
from imgembed.worker.engine import EmbeddingModel, Tower, use_onnx
from imgembed.worker.memory import return_freed_memory
from imgembed.worker.model_errors import ModelLoadError, ModelUnavailable

if TYPE_CHECKING:
    from imgembed.metrics import WorkerMetrics

log = logging.getLogger(__name__)

TRIM_EVERY_SECONDS = 1.0  # how often a worker hands freed heap memory back to the OS, at most
FIRST_RETRY_SECONDS = 1.0  # after a model fails to load; doubled each time, up to the setting's cap


@dataclass
class Outage:
    """A model that could not be loaded: why, since when (wall clock), and when to try again."""

    reason: str
    since: float
    next_try: float  # time.monotonic()
    delay: float

    def as_report(self, model: str, tower: str) -> dict[str, object]:
        return {"model": model, "tower": tower, "reason": self.reason,
                "since": datetime.fromtimestamp(self.since, timezone.utc).isoformat()}


@dataclass
class WorkerState:
    """What a worker process keeps between tasks: its settings, a database connection per task
    thread, the models it has loaded and the decode threads. Built lazily on the first task.

    The worker runs IMGEMBED_WORKER_THREADS tasks at once: while one batch is in the model's
    forward pass (one pass on the device at a time, under ``forward_lock``), the next is read
    and decoded and the previous one written, so reading, decoding and writing hide behind the
    model. Each model's passes run on its own batcher thread, which merges waiting batches."""

    settings: Settings
    models: dict[tuple[str, Tower], EmbeddingModel] = field(default_factory=dict)
    batchers: dict[tuple[str, Tower], ForwardBatcher[Any]] = field(default_factory=dict)
    batches: int = 0
    forward_lock: threading.Lock = field(default_factory=threading.Lock)
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    outages: dict[tuple[str, Tower], Outage] = field(default_factory=dict)
    _checked_checkpoints: set[str] = field(default_factory=set)
    _local: threading.local = field(default_factory=threading.local)
    _decoders: ThreadPoolExecutor | None = None
    _last_trim: float = 0.0
    metrics: WorkerMetrics | None = None  # IMGEMBED_METRICS_PORT

    def __post_init__(self) -> None:
        use_pixel_cap(self.settings.max_image_pixels)

    def connection(self) -> psycopg.Connection:
        connection: psycopg.Connection | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.broken:
            connection = db.connect(require_database_url(self.settings), application_name="imgembed-worker")
            self._local.connection = connection
        return connection

    def decoders(self) -> ThreadPoolExecutor:
        with self._load_lock:
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="imgembed-decode")
            return self._decoders

    def model(self, name: str, tower: Tower = "image") -> EmbeddingModel:
        """The model, loaded once per process with only the tower jobs need (image or text). A
        model that fails to load is tried again after a delay that doubles each time, up to
        IMGEMBED_MODEL_RETRY_MAX_SECONDS; meanwhile this raises ModelUnavailable at once."""
        key = (name, tower)
        with self._load_lock:
            if key in self.models:
                return self.models[key]
            outage = self.outages.get(key)
            now = time.monotonic()
            if outage is not None and now < outage.next_try:
                raise ModelUnavailable(outage.reason, retry_in=outage.next_try - now)
            try:
                spec = parse_model_spec(name)
                self._check_registered_checkpoint(spec)
                self.models[key] = self._load(spec, tower)
            except ModelLoadError as error:
                if self.metrics is not None:
                    self.metrics.model_state(name, tower, loaded=False)
                delay = min(outage.delay * 2 if outage else FIRST_RETRY_SECONDS, self.settings.model_retry_max_seconds)
                self.outages[key] = Outage(str(error), outage.since if outage else time.time(), now + delay, delay)
                log.warning("model %s unavailable (%s tower): %s; its jobs wait, and it is tried again in %.0f s",
                            name, tower, error, delay)
                raise ModelUnavailable(str(error), retry_in=delay) from error
            if self.outages.pop(key, None) is not None:
                log.info("model %s (%s tower) loaded after an outage", name, tower)
            if self.metrics is not None:
                self.metrics.model_state(name, tower, loaded=True, load_seconds=time.monotonic() - now)
                if self.models[key].device.type == "cuda":
                    self.metrics.watch_gpu(*gpu_probes(str(self.models[key].device)))
            return self.models[key]

    def _load(self, spec: ModelSpec, tower: Tower) -> EmbeddingModel:
        """The tower on ONNX Runtime (IMGEMBED_RUNTIME, see imgembed.worker.engine) or PyTorch; timm's
        image-only models on PyTorch."""
        if spec.is_timm:
            from imgembed.worker.pytorch.timm_model import load_timm_model

            return load_timm_model(spec, self.settings.device, tower)
        if use_onnx(self.settings):
            from imgembed.worker.onnx.cache import ExportFailed, OnnxUnsupported
            from imgembed.worker.onnx.model import load_onnx_model

            try:
                return load_onnx_model(spec, tower, self.settings)
            except OnnxUnsupported as error:
                if self.settings.runtime == "onnx":
                    raise ModelLoadError(f"model {spec.name}: its {tower} tower cannot run on ONNX Runtime ({error}); "
                                         "set IMGEMBED_RUNTIME=torch or auto") from error
                log.info("model %s: its %s tower runs on PyTorch (%s)", spec.name, tower, error)
            except ExportFailed as error:  # e.g. an unwritable model directory: PyTorch may still load it
                if self.settings.runtime == "onnx":
                    raise
                log.warning("model %s: %s; its %s tower runs on PyTorch instead", spec.name, error, tower)
        from imgembed.worker.pytorch.embedding import load_model

        return load_model(spec, self.settings.device, tower=tower, model_dir=self.settings.models_path)

    def outage_report(self) -> list[dict[str, object]]:
        """The models this worker cannot load now, for its heartbeat."""
        with self._load_lock:
            return [outage.as_report(name, tower) for (name, tower), outage in sorted(self.outages.items())]

    def _check_registered_checkpoint(self, spec: ModelSpec) -> None:
        """A model's checkpoint must still be the file it was registered with: a column must never
        hold the vectors of two sets of weights under one model name."""
        stored = stored_checkpoint(self.settings.models_path, spec)
        checkpoint = stored.path if stored is not None else spec.checkpoint_path
        if checkpoint is None or spec.name in self._checked_checkpoints or not checkpoint.is_file():
            return  # a missing file: load_model says so
        registered = registered_sha256(self.connection(), spec.name)
        if registered is not None:  # hashing reads the whole file: only with a checksum to match
            found = file_sha256(checkpoint)
            if found != registered:
                raise ModelLoadError(
                    f"model {spec.name}: checkpoint {checkpoint} is not the file it was registered with (sha256 "
                    f"{registered[:12]}..., now {found[:12]}...); put the registered file back, or register the "
                    "new one under a new path and switch to it (imgembed models add / use)")
        self._checked_checkpoints.add(spec.name)

    def batcher(self, name: str, tower: Literal["image", "text"]) -> ForwardBatcher[Any]:
        """The thread that runs this model's forward passes (the model is loaded first)."""
        model = self.model(name, tower)
        with self._load_lock:
            if (name, tower) not in self.batchers:
                forward: Callable[[list[Any]], np.ndarray] = model.embed_images if tower == "image" else model.embed_texts
                with self.forward_lock:  # measuring needs the device to itself
                    max_batch = forward_batch_size(model, tower, self.settings)
                metrics = self.metrics
                on_pass = (None if metrics is None
                           else lambda inputs, seconds: metrics.forward_pass(name, tower, inputs, seconds))
                self.batchers[(name, tower)] = ForwardBatcher(forward, max_batch, f"{tower}-{name}", self.forward_lock,
                                                              on_pass)
            return self.batchers[(name, tower)]

    def count_batch(self) -> None:
        with self._load_lock:
            self.batches += 1

    def return_freed_memory(self) -> None:
        """Hand the heap's free pages back to the OS, at most every TRIM_EVERY_SECONDS. Freed
        decoded pictures and activations otherwise stay in glibc's arenas, scattered, and the
        next pass's activations land beside them: in a 15-minute ViT-B-32 benchmark the worker
        grew from 1.44 to 1.65 GB. A trim takes about 7 ms (it holds the allocator meanwhile)."""
        now = time.monotonic()
        with self._load_lock:
            if now - self._last_trim < TRIM_EVERY_SECONDS:
                return
            self._last_trim = now
        return_freed_memory()


def gpu_probes(device: str) -> tuple[Callable[[], float], Callable[[], float]]:
    """(memory PyTorch holds on the device in bytes, its utilisation from 0 to 1) for the metrics."""
    import torch

    def utilisation() -> float:
        try:
            return float(torch.cuda.utilization(device)) / 100
        except Exception:  # noqa: BLE001 - needs NVML (pynvml); without it the gauge says NaN
            return float("nan")

    return (lambda: float(torch.cuda.memory_reserved(device))), utilisation


def forward_batch_size(model: EmbeddingModel, tower: Tower, settings: Settings) -> int:
    """Most inputs in one forward pass: IMGEMBED_FORWARD_BATCH, or for `auto` on CUDA the best
    image batch measured up to 1,024, else the claim size (IMGEMBED_BATCH_SIZE), since larger
    passes gain nothing on a CPU."""
    if settings.forward_batch:
        return settings.forward_batch
    if model.device.type != "cuda" or tower != "image":
        return settings.batch_size
    import torch

    size = model.input_size
    return tune_max_batch(lambda count: model.embed_pixels(torch.zeros(count, 3, size, size)), ceiling=1024)
