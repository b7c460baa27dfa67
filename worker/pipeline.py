"""One claimed batch, start to end: read the rows' images, decode them in parallel, embed the good
ones in one forward pass, write vectors and failures in one transaction."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import numpy as np
import psycopg
import torch

from worker import db
from worker.batcher import ForwardBatcher, tune_max_batch
from worker.device_decode import TensorPreprocess, apply_orientation, decode_jpegs, jpeg_orientation
from worker.embedding import LoadedModel, ModelLoadError, Tower, load_model
from worker.images import ImageError, ImageSource, decode_image, read_source
from worker.memory import return_freed_memory
from worker.model_spec import ModelSpec, file_sha256, parse_model_spec
from worker.models import registered_sha256
from worker.pixels import ModelInput
from worker.settings import Settings, require_database_url

log = logging.getLogger(__name__)

TRIM_EVERY_SECONDS = 1.0  # how often a worker hands freed heap memory back to the OS, at most


@dataclass(frozen=True)
class BatchOutcome:
    claim_id: str
    model: str
    jobs: int
    written: int
    failed: int
    gone: int
    decode_ms: float
    embed_ms: float
    write_ms: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class WorkerRuntime:
    """What a worker process keeps between tasks: its settings, a database connection per task
    thread, the models it has loaded and the decode threads. Built lazily on the first task.

    The worker runs IMGEMBED_WORKER_THREADS tasks at once: while one batch is in the model's
    forward pass (one pass on the device at a time, under ``forward_lock``), the next is read
    and decoded and the previous one written, so reading, decoding and writing hide behind the
    model. Each model's passes run on its own batcher thread, which merges waiting batches."""

    settings: Settings
    models: dict[tuple[str, Tower], LoadedModel] = field(default_factory=dict)
    batchers: dict[tuple[str, Tower], ForwardBatcher[Any]] = field(default_factory=dict)
    batches: int = 0
    forward_lock: threading.Lock = field(default_factory=threading.Lock)
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    _checked_checkpoints: set[str] = field(default_factory=set)
    _local: threading.local = field(default_factory=threading.local)
    _decoders: ThreadPoolExecutor | None = None
    _last_trim: float = 0.0

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

    def model(self, name: str, tower: Tower = "image") -> LoadedModel:
        """The model, loaded once per process with only the tower jobs need (image or text)."""
        with self._load_lock:
            if (name, tower) not in self.models:
                spec = parse_model_spec(name)
                self._check_registered_checkpoint(spec)
                self.models[(name, tower)] = load_model(spec, self.settings.device, tower=tower)
            return self.models[(name, tower)]

    def _check_registered_checkpoint(self, spec: ModelSpec) -> None:
        """A model's checkpoint must still be the file it was registered with: a column must never
        hold the vectors of two sets of weights under one model name."""
        checkpoint = spec.checkpoint_path
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
                self.batchers[(name, tower)] = ForwardBatcher(forward, max_batch, f"{tower}-{name}", self.forward_lock)
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


def forward_batch_size(model: LoadedModel, tower: Tower, settings: Settings) -> int:
    """Most inputs in one forward pass: IMGEMBED_FORWARD_BATCH, or for `auto` on CUDA the best
    image batch measured up to 1,024, else the claim size (IMGEMBED_BATCH_SIZE), since larger
    passes gain nothing on a CPU."""
    if settings.forward_batch:
        return settings.forward_batch
    if model.device.type != "cuda" or tower != "image":
        return settings.batch_size
    size = model.input_size
    return tune_max_batch(lambda count: model.embed_pixels(torch.zeros(count, 3, size, size)), ceiling=1024)


def _prepare(image: db.ClaimedImage, model: LoadedModel, settings: Settings) -> ModelInput | ImageError:
    try:
        data = read_source(ImageSource(content=image.content, uri=image.uri), settings)
    except ImageError as error:
        return error
    return preprocess_bytes(data, model, settings)


def preprocess_bytes(data: bytes, model: LoadedModel, settings: Settings) -> ModelInput | ImageError:
    """Image bytes as the model takes them (see LoadedModel.prepare), or why they cannot be."""
    try:
        return model.prepare(decode_image(data, settings, target_size=model.input_size))
    except ImageError as error:
        return error
    except Exception as error:  # noqa: BLE001 - anything else still fails this image alone
        return ImageError(f"unexpected {type(error).__name__} while preparing the image: {error}")


DEVICE_DECODE_CHUNK = 32  # full-size decoded photos on the device at once (a 12 MP photo is 36 MB)


def _prepare_on_device(
    runtime: WorkerRuntime, pictures: list[db.ClaimedImage], model: LoadedModel, tensor_preprocess: TensorPreprocess
) -> list[ModelInput | ImageError]:
    """IMGEMBED_JPEG_DECODE=device: read in the decode threads, decode plain JPEGs on the model's
    device and preprocess them there; everything else goes through Pillow as usual."""
    settings = runtime.settings

    def read(item: db.ClaimedImage) -> tuple[bytes | ImageError, int | None]:
        try:
            data = read_source(ImageSource(content=item.content, uri=item.uri), settings)
        except ImageError as error:
            return error, None
        return data, jpeg_orientation(data, settings)

    read_results = list(runtime.decoders().map(read, pictures))
    prepared: list[ModelInput | ImageError | None] = [None] * len(pictures)
    eligible = [index for index, (_, orientation) in enumerate(read_results) if orientation is not None]
    for first in range(0, len(eligible), DEVICE_DECODE_CHUNK):
        chunk = eligible[first:first + DEVICE_DECODE_CHUNK]
        decoded = decode_jpegs([read_results[index][0] for index in chunk], model.device)  # type: ignore[misc]
        for index, image in zip(chunk, decoded):
            if image is None:
                continue
            try:
                prepared[index] = tensor_preprocess(apply_orientation(image, read_results[index][1] or 1))
            except RuntimeError as error:  # e.g. out of device memory: Pillow takes this one
                log.warning("device preprocessing failed (%s); using Pillow for this image", error)

    def on_cpu(index: int) -> ModelInput | ImageError:
        data = read_results[index][0]
        return data if isinstance(data, ImageError) else preprocess_bytes(data, model, settings)

    rest = [index for index, result in enumerate(prepared) if result is None]
    for index, result in zip(rest, runtime.decoders().map(on_cpu, rest)):
        prepared[index] = result
    return prepared  # type: ignore[return-value]


def _embed(
    batcher: ForwardBatcher[Any],
    inputs: list[Any],
    job_ids: list[int],
    done: list[tuple[int, np.ndarray | None]],
    failures: list[db.JobFailure],
) -> float:
    """Embed through the model's batcher; a failed pass (e.g. out of memory) fails these jobs for a
    retry. Returns the milliseconds spent, the wait for the pass included."""
    started = time.perf_counter()
    try:
        vectors = batcher.embed(inputs)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: retry later
        failures.extend(
            db.JobFailure(job_id, f"embedding failed: {type(error).__name__}: {error}", True) for job_id in job_ids
        )
    else:
        done.extend(zip(job_ids, vectors))
    return (time.perf_counter() - started) * 1000


def _prepare_pictures(
    runtime: WorkerRuntime, model: LoadedModel, pictures: list[db.ClaimedImage]
) -> list[ModelInput | ImageError]:
    """Each picture as the model takes it, or the reason it cannot be taken."""
    settings = runtime.settings
    if settings.jpeg_decode == "device" and model.tensor_preprocess is not None:
        return _prepare_on_device(runtime, pictures, model, model.tensor_preprocess)
    return list(runtime.decoders().map(lambda item: _prepare(item, model, settings), pictures))


def run_claim(runtime: WorkerRuntime, claim_id: UUID, model_name: str) -> BatchOutcome:
    settings = runtime.settings
    connection = runtime.connection()
    owned = db.start_claim(connection, claim_id, settings.lease_seconds)
    if not owned:  # a stale message: the claim expired and was handed to someone else
        log.info("claim %s: nothing owned any more, skipped", claim_id)
        return BatchOutcome(str(claim_id), model_name, 0, 0, 0, 0, 0.0, 0.0, 0.0)

    images = db.claimed_images(connection, claim_id)
    present = {image.job_id for image in images}
    done: list[tuple[int, np.ndarray | None]] = [(job_id, None) for job_id in owned if job_id not in present]
    gone = len(done)
    failures: list[db.JobFailure] = []

    texts = [item for item in images if item.text is not None]
    pictures = [item for item in images if item.text is None]
    decode_ms = embed_ms = 0.0
    if pictures:
        try:
            image_model = runtime.model(model_name, "image")
        except ModelLoadError as error:
            failures += [db.JobFailure(item.job_id, str(error), True) for item in pictures]
        else:
            started = time.perf_counter()
            prepared = _prepare_pictures(runtime, image_model, pictures)
            decode_ms = (time.perf_counter() - started) * 1000
            good = [(item.job_id, result) for item, result in zip(pictures, prepared) if not isinstance(result, ImageError)]
            failures += [db.JobFailure(item.job_id, str(result), result.retryable)
                         for item, result in zip(pictures, prepared) if isinstance(result, ImageError)]
            if good:
                embed_ms += _embed(runtime.batcher(model_name, "image"), [pixels for _, pixels in good],
                                   [job_id for job_id, _ in good], done, failures)
    if texts:
        try:
            text_batcher = runtime.batcher(model_name, "text")
        except ModelLoadError as error:
            failures += [db.JobFailure(item.job_id, str(error), True) for item in texts]
        else:
            embed_ms += _embed(text_batcher, [item.text or "" for item in texts], [item.job_id for item in texts],
                               done, failures)

    write_started = time.perf_counter()
    written = db.finish_batch(
        connection, claim_id, done, failures, settings.max_attempts, settings.retry_backoff_seconds
    )
    write_ms = (time.perf_counter() - write_started) * 1000
    runtime.count_batch()
    runtime.return_freed_memory()
    outcome = BatchOutcome(
        str(claim_id), model_name, len(owned), written, len(failures), gone, decode_ms, embed_ms, write_ms
    )
    log.info(
        "batch claim=%s model=%s jobs=%d written=%d failed=%d gone=%d decode_ms=%.0f embed_ms=%.0f write_ms=%.0f",
        outcome.claim_id, model_name, outcome.jobs, written, outcome.failed, gone, decode_ms, embed_ms, write_ms,
    )
    return outcome
