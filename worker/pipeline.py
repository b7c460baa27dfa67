"""One claimed batch, start to end: read the rows' images, decode them in parallel, embed the good
ones in one forward pass, write vectors and failures in one transaction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
import psycopg

from imgembed import queue
from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError, Reason, plain_words
from imgembed.images.sources import ImageSource, read_source
from imgembed.settings import Settings
from imgembed.worker.batcher import ForwardBatcher
from imgembed.worker.content import group_by_content, hashed
from imgembed.worker.engine import EmbeddingModel
from imgembed.worker.model_errors import ModelUnavailable
from imgembed.worker.process_state import WorkerState
from imgembed.worker.pytorch.pixels import ModelInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    claim_id: str
    model: str
    jobs: int
    written: int
    failed: int
    waiting: int  # handed back without spending an attempt (model unavailable, forward pass failed)
    gone: int
    reused: int  # given a vector the model had already made from the same bytes
    images_embedded: int  # distinct images through the forward pass (identical bytes count once)
    decode_ms: float
    embed_ms: float
    write_ms: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _read(image: queue.ClaimedImage, settings: Settings) -> bytes | ImageError:
    try:
        return read_source(ImageSource(content=image.content, uri=image.uri,
                                       from_reader=image.table_name == queue.QUERY_IMAGE_TABLE), settings)
    except ImageError as error:
        return error


def preprocess_bytes(data: bytes, model: EmbeddingModel, settings: Settings) -> ModelInput | ImageError:
    """Image bytes as the model takes them (see EmbeddingModel.prepare), or why they cannot be."""
    try:
        return model.prepare(decode_image(data, settings, target_size=model.input_size))
    except ImageError as error:
        return error
    except Exception as error:  # noqa: BLE001 - anything else still fails this image alone
        return ImageError(Reason.CORRUPT_IMAGE,
                          f"unexpected {type(error).__name__} while preparing the image: {plain_words(error)}")


DEVICE_DECODE_CHUNK = 32  # full-size decoded photos on the device at once (a 12 MP photo is 36 MB)


def _prepare_on_device(
    runtime: WorkerState, images: list[bytes], model: EmbeddingModel, tensor_preprocess: Any
) -> list[ModelInput | ImageError]:
    """IMGEMBED_JPEG_DECODE=device: decode plain JPEGs on the model's device and preprocess them
    there; everything else goes through Pillow as usual."""
    from imgembed.worker.pytorch.device_decode import apply_orientation, decode_jpegs, jpeg_orientation

    settings = runtime.settings
    orientations = list(runtime.decoders().map(lambda data: jpeg_orientation(data, settings), images))
    prepared: list[ModelInput | ImageError | None] = [None] * len(images)
    eligible = [index for index, orientation in enumerate(orientations) if orientation is not None]
    for first in range(0, len(eligible), DEVICE_DECODE_CHUNK):
        chunk = eligible[first:first + DEVICE_DECODE_CHUNK]
        decoded = decode_jpegs([images[index] for index in chunk], model.device)
        for index, image in zip(chunk, decoded):
            if image is None:
                continue
            try:
                prepared[index] = tensor_preprocess(apply_orientation(image, orientations[index] or 1))
            except RuntimeError as error:  # e.g. out of device memory: Pillow takes this one
                log.warning("device preprocessing failed (%s); using Pillow for this image", error)

    rest = [index for index, result in enumerate(prepared) if result is None]
    for index, result in zip(rest, runtime.decoders().map(
            lambda index: preprocess_bytes(images[index], model, settings), rest)):
        prepared[index] = result
    return prepared  # type: ignore[return-value]


@dataclass
class ClaimResults:
    """What becomes of a claim's jobs: vectors to write, failures of their rows, and jobs handed
    back without spending an attempt because what stopped them was not about their rows."""

    done: list[tuple[int, np.ndarray | None]] = field(default_factory=list)
    content_hashes: dict[int, bytes] = field(default_factory=dict)  # by job: the bytes its vector is of
    reused: int = 0  # jobs given a vector already made from the same bytes
    images_embedded: int = 0  # distinct images sent through the forward pass
    failures: list[queue.JobFailure] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    requeue_reason: str = ""
    requeue_delay: float = 0.0

    def requeue(self, job_ids: list[int], reason: str, delay: float) -> None:
        self.requeued += job_ids
        self.requeue_reason = reason
        self.requeue_delay = max(self.requeue_delay, delay)


def _embed(batcher: ForwardBatcher[Any], inputs: list[Any], job_groups: list[list[int]], results: ClaimResults,
           settings: Settings) -> float:
    """Embed through the model's batcher; each input's vector goes to every job of its group (the
    jobs whose images are the same bytes). A pass that fails (out of memory even after splitting,
    a device error) is no row's fault: these jobs wait and try again. Returns the milliseconds
    spent, the wait for the pass included."""
    started = time.perf_counter()
    try:
        vectors = batcher.embed(inputs)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: the rows are not to blame
        job_ids = [job_id for group in job_groups for job_id in group]
        results.requeue(job_ids, f"waiting: embedding failed: {type(error).__name__}: {error}",
                        settings.retry_backoff_seconds)
        log.warning("a forward pass failed (%s: %s); its %d jobs wait and are tried again", type(error).__name__,
                    error, len(job_ids))
    else:
        results.done.extend((job_id, vector) for group, vector in zip(job_groups, vectors) for job_id in group)
    return (time.perf_counter() - started) * 1000


def _prepare_images(runtime: WorkerState, model: EmbeddingModel, images: list[bytes]) -> list[ModelInput | ImageError]:
    """Each image as the model takes it, or the reason it cannot be taken."""
    settings = runtime.settings
    if settings.jpeg_decode == "device" and model.tensor_preprocess is not None:
        return _prepare_on_device(runtime, images, model, model.tensor_preprocess)
    return list(runtime.decoders().map(lambda data: preprocess_bytes(data, model, settings), images))


def _known_vectors(runtime: WorkerState, model_name: str, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
    """Vectors the model already made from these bytes; none if the database cannot say now (the
    images are then embedded again, which is only slower)."""
    try:
        return queue.vectors_by_content(runtime.connection(), model_name, hashes)
    except psycopg.Error as error:
        log.warning("could not look up vectors by content (%s); embedding every image", str(error).strip())
        return {}


def _model_waits(results: ClaimResults, items: list[queue.ClaimedImage], error: ModelUnavailable) -> None:
    results.requeue([item.job_id for item in items], f"waiting: model unavailable: {error}", error.retry_in)


def _embed_pictures(runtime: WorkerState, model_name: str, pictures: list[queue.ClaimedImage],
                    results: ClaimResults) -> tuple[float, float]:
    """Read the pictures; give those whose bytes the model already embedded that vector; decode and
    embed each other distinct content once. Each bad one fails alone. Returns (decode ms, embed ms)."""
    try:
        image_model = runtime.model(model_name, "image")
        image_batcher = runtime.batcher(model_name, "image")
    except ModelUnavailable as error:
        _model_waits(results, pictures, error)
        return 0.0, 0.0
    settings = runtime.settings
    started = time.perf_counter()
    groups = group_by_content([item.job_id for item in pictures],
                              list(runtime.decoders().map(lambda item: hashed(_read(item, settings)), pictures)))
    results.failures += [queue.JobFailure(job_id, str(error), error.retryable) for job_id, error in groups.unreadable]
    results.content_hashes.update(groups.hash_of_job())
    known = _known_vectors(runtime, model_name, list(groups.jobs_by_hash))
    for digest, vector in known.items():
        results.done += [(job_id, vector) for job_id in groups.jobs_by_hash[digest]]
        results.reused += len(groups.jobs_by_hash[digest])
    to_embed = [digest for digest in groups.jobs_by_hash if digest not in known]
    prepared = _prepare_images(runtime, image_model, [groups.data_by_hash[digest] for digest in to_embed])
    decode_ms = (time.perf_counter() - started) * 1000
    good: list[tuple[list[int], ModelInput]] = []
    for digest, result in zip(to_embed, prepared):
        if isinstance(result, ImageError):
            results.failures += [queue.JobFailure(job_id, str(result), result.retryable)
                                 for job_id in groups.jobs_by_hash[digest]]
        else:
            good.append((groups.jobs_by_hash[digest], result))
    if not good:
        return decode_ms, 0.0
    results.images_embedded = len(good)
    embed_ms = _embed(image_batcher, [pixels for _, pixels in good], [job_ids for job_ids, _ in good], results,
                      settings)
    return decode_ms, embed_ms


def _embed_texts(runtime: WorkerState, model_name: str, texts: list[queue.ClaimedImage],
                 results: ClaimResults) -> float:
    """Embed the texts (search queries, label prompts). Returns the embed ms."""
    try:
        text_batcher = runtime.batcher(model_name, "text")
    except ModelUnavailable as error:
        _model_waits(results, texts, error)
        return 0.0
    return _embed(text_batcher, [item.text or "" for item in texts], [[item.job_id] for item in texts], results,
                  runtime.settings)


def _write(runtime: WorkerState, claim_id: UUID, results: ClaimResults) -> int:
    """Hand back what waits and write the rest in one transaction each. If the database goes away
    meanwhile, the work done is not thrown away: it is written once the database answers again,
    for as long as the claim's lease lasts (after that the jobs are handed out again anyway)."""
    settings = runtime.settings
    deadline = time.monotonic() + settings.lease_seconds
    delay = 0.5
    while True:
        try:
            connection = runtime.connection()
            if results.requeued:
                queue.requeue_claim(connection, claim_id, results.requeued, results.requeue_reason,
                                    results.requeue_delay)
            return queue.finish_batch(connection, claim_id, results.done, results.failures, settings.max_attempts,
                                      settings.retry_backoff_seconds, results.content_hashes)
        except psycopg.OperationalError as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("claim %s: the database is unavailable (%s); writing its results again in %.1f s",
                        claim_id, str(error).strip(), delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def run_claim(runtime: WorkerState, claim_id: UUID, model_name: str) -> BatchOutcome:
    settings = runtime.settings
    connection = runtime.connection()
    owned = queue.start_claim(connection, claim_id, settings.lease_seconds)
    if not owned:  # a stale message: the claim expired and was handed to someone else
        log.info("claim %s: nothing owned any more, skipped", claim_id)
        return BatchOutcome(str(claim_id), model_name, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)

    images = queue.claimed_images(connection, claim_id)
    present = {image.job_id for image in images}
    results = ClaimResults(done=[(job_id, None) for job_id in owned if job_id not in present])
    gone = len(results.done)
    pictures = [item for item in images if item.text is None]
    texts = [item for item in images if item.text is not None]
    decode_ms, embed_ms = _embed_pictures(runtime, model_name, pictures, results) if pictures else (0.0, 0.0)
    if texts:
        embed_ms += _embed_texts(runtime, model_name, texts, results)

    write_started = time.perf_counter()
    written = _write(runtime, claim_id, results)
    write_ms = (time.perf_counter() - write_started) * 1000
    runtime.count_batch()
    runtime.return_freed_memory()
    if runtime.metrics is not None:
        table_of = {item.job_id: item.table_name for item in images}
        runtime.metrics.claim(model_name, [table_of[job_id] for job_id, vector in results.done if vector is not None],
                              [(table_of.get(failure.job_id, ""), failure.error) for failure in results.failures],
                              results.reused, decode_ms / 1000, write_ms / 1000)
    outcome = BatchOutcome(str(claim_id), model_name, len(owned), written, len(results.failures),
                           len(results.requeued), gone, results.reused, results.images_embedded, decode_ms, embed_ms,
                           write_ms)
    log.info(
        "batch claim=%s model=%s jobs=%d written=%d failed=%d waiting=%d gone=%d reused=%d images=%d "
        "decode_ms=%.0f embed_ms=%.0f write_ms=%.0f", outcome.claim_id, model_name, outcome.jobs, written,
        outcome.failed, outcome.waiting, gone, results.reused, results.images_embedded, decode_ms, embed_ms, write_ms,
    )
    return outcome
