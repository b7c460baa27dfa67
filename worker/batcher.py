"""One thread per loaded model runs all its forward passes. Task threads hand it their decoded
images (or texts) and wait; whatever is waiting when a pass starts goes in together, up to
``max_batch`` inputs, so batches form across jobs and tasks while the previous pass runs. One
thread also means one allocator arena holds the activations, not one per task thread.

On CUDA a pass that runs out of memory is split in halves and ``max_batch`` halves for the
passes after it; ``tune_max_batch`` picks the starting size by measuring."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass
class _Request(Generic[Item]):
    items: list[Item]
    result: Future[np.ndarray] = field(default_factory=Future)


def _out_of_memory(error: BaseException) -> bool:
    """A PyTorch out-of-memory error (PyTorch is only loaded where a model runs on it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def _free_cached_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.empty_cache()


class ForwardBatcher(Generic[Item]):
    """Runs ``forward(items) -> (len(items), dim) array`` on its own thread, merging requests."""

    def __init__(self, forward: Callable[[list[Item]], np.ndarray], max_batch: int, name: str,
                 device_lock: threading.Lock | None = None,
                 on_pass: Callable[[int, float], None] | None = None) -> None:
        self._forward = forward
        self._on_pass = on_pass  # told (inputs, seconds) after each pass that succeeded
        self.max_batch = max(1, max_batch)
        self._device_lock = device_lock or threading.Lock()
        self._waiting: deque[_Request[Item]] = deque()
        self._ready = threading.Condition()
        self.passes = 0
        self.largest_pass = 0
        self._thread = threading.Thread(target=self._run, name=f"imgembed-forward-{name}", daemon=True)
        self._thread.start()

    def embed(self, items: Sequence[Item]) -> np.ndarray:
        """The vectors of ``items``, in order; raises what the forward pass raised."""
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        requests = [_Request(list(items[start:start + self.max_batch]))
                    for start in range(0, len(items), self.max_batch)]
        with self._ready:
            self._waiting.extend(requests)
            self._ready.notify()
        return np.concatenate([request.result.result() for request in requests])

    def _next_pass(self) -> list[_Request[Item]]:
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            taken = [self._waiting.popleft()]
            size = len(taken[0].items)
            while self._waiting and size + len(self._waiting[0].items) <= self.max_batch:
                size += len(self._waiting[0].items)
                taken.append(self._waiting.popleft())
            return taken

    def _run(self) -> None:
        while True:
            requests = self._next_pass()
            items = [item for request in requests for item in request.items]
            try:
                vectors = self._forward_splitting(items)
            except BaseException as error:  # noqa: BLE001 - handed to every waiting task
                for request in requests:
                    request.result.set_exception(error)
                continue
            start = 0
            for request in requests:
                request.result.set_result(vectors[start:start + len(request.items)])
                start += len(request.items)

    def _forward_splitting(self, items: list[Item]) -> np.ndarray:
        try:
            with self._device_lock:
                started = time.perf_counter()
                vectors = self._forward(items)
                seconds = time.perf_counter() - started
            self.passes += 1
            self.largest_pass = max(self.largest_pass, len(items))
            if self._on_pass is not None:
                self._on_pass(len(items), seconds)
            return vectors
        except Exception as error:
            if not _out_of_memory(error) or len(items) == 1:
                raise
        _free_cached_device_memory()
        self.max_batch = max(1, min(self.max_batch, len(items)) // 2)
        log.warning("out of device memory with %d inputs in one pass: batches of at most %d from now on",
                    len(items), self.max_batch)
        half = len(items) // 2
        return np.concatenate([self._forward_splitting(items[:half]), self._forward_splitting(items[half:])])


def tune_max_batch(run_batch: Callable[[int], object], ceiling: int, start: int = 16, min_gain: float = 0.05,
                   clock: Callable[[], float] = time.perf_counter,
                   measured: dict[int, float | None] | None = None) -> int:
    """The batch size to use: doubled from ``start`` while each doubling still runs (no
    out-of-memory error) and raises throughput by at least ``min_gain``, up to ``ceiling``.
    ``measured``, when given, receives each size tried and its inputs per second (None: it did
    not fit)."""
    def rate(size: int) -> float | None:
        """Inputs per second at this size; None when it does not fit in device memory."""
        try:
            run_batch(size)  # warm-up: kernels picked, memory pools grown
            started = clock()
            run_batch(size)
            result: float | None = size / max(clock() - started, 1e-9)
        except Exception as error:
            if not _out_of_memory(error):
                raise
            _free_cached_device_memory()
            result = None
        if measured is not None:
            measured[size] = result
        return result

    best_size = min(start, ceiling)
    best_rate = rate(best_size)
    if best_rate is None:
        return max(1, best_size // 2)
    while best_size * 2 <= ceiling:
        doubled = rate(best_size * 2)
        if doubled is None or doubled < best_rate * (1 + min_gain):
            break
        best_size, best_rate = best_size * 2, doubled
    log.info("forward batch size %d (%.0f inputs/s when measured)", best_size, best_rate)
    return best_size
