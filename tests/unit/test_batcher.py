"""The forward batcher: results stay with their requests, waiting requests merge, a pass that runs
out of memory is split, and batch-size tuning stops where throughput stops growing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from imgembed.models.names import parse_model_spec
from imgembed.worker.batcher import ForwardBatcher, tune_max_batch
from imgembed.worker.pytorch.embedding import load_model


def test_each_request_gets_its_own_vectors_in_order() -> None:
    batcher: ForwardBatcher[float] = ForwardBatcher(lambda items: np.array([[x, 2 * x] for x in items]), 4, "test")
    vectors = batcher.embed([float(i) for i in range(10)])  # split into requests of 4, 4 and 2
    np.testing.assert_array_equal(vectors[:, 0], np.arange(10))
    np.testing.assert_array_equal(vectors[:, 1], 2 * np.arange(10))


def test_waiting_requests_merge_into_one_pass() -> None:
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def forward(items: list[int]) -> np.ndarray:
        sizes.append(len(items))
        started.set()
        release.wait(10)
        return np.array([[float(x)] for x in items])

    batcher: ForwardBatcher[int] = ForwardBatcher(forward, 64, "test")
    results: dict[int, np.ndarray] = {}
    first = threading.Thread(target=lambda: results.__setitem__(0, batcher.embed([0])))
    first.start()
    assert started.wait(10)
    # While the first pass runs, three tasks queue 5 inputs each: the next pass takes all 15.
    others = [threading.Thread(target=lambda n=n: results.__setitem__(n, batcher.embed([n * 10 + i for i in range(5)])))
              for n in (1, 2, 3)]
    for thread in others:
        thread.start()
    while len(batcher._waiting) < 3:  # noqa: SLF001 - observing the queue is the point
        threading.Event().wait(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert sizes == [1, 15]
    for n in (1, 2, 3):
        np.testing.assert_array_equal(results[n][:, 0], [n * 10 + i for i in range(5)])


def test_errors_reach_every_waiting_task() -> None:
    def forward(items: list[int]) -> np.ndarray:
        raise ValueError("broken model")

    batcher: ForwardBatcher[int] = ForwardBatcher(forward, 8, "test")
    with pytest.raises(ValueError, match="broken model"):
        batcher.embed([1, 2, 3])
    with pytest.raises(ValueError, match="broken model"):
        batcher.embed([4])


def test_out_of_memory_splits_the_pass_and_lowers_the_batch() -> None:
    # Stands in for the device: more than 5 inputs at once do not fit.
    def forward(items: list[int]) -> np.ndarray:
        if len(items) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated device with room for 5)")
        return np.array([[float(x)] for x in items])

    batcher: ForwardBatcher[int] = ForwardBatcher(forward, 16, "test")
    vectors = batcher.embed(list(range(16)))
    np.testing.assert_array_equal(vectors[:, 0], np.arange(16))
    assert batcher.max_batch <= 5 and batcher.largest_pass <= 5


class SimulatedDevice:
    """A device with room for ``limit`` inputs whose passes take ``fixed + per_input * size``
    seconds of a simulated clock: the tuning's arithmetic, with no timing of this machine."""

    def __init__(self, limit: int, fixed: float, per_input: float) -> None:
        self.limit, self.fixed, self.per_input = limit, fixed, per_input
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def run(self, size: int) -> None:
        if size > self.limit:
            raise torch.OutOfMemoryError("simulated")
        self.now += self.fixed + self.per_input * size


@pytest.mark.parametrize(("limit", "fixed", "per_input", "ceiling", "chosen"), [
    (100, 0.02, 0.0, 1024, 64),        # larger passes always gain: stops where memory ends
    (10_000, 0.02, 0.0, 256, 256),     # ... or at the ceiling
    (8, 0.02, 0.0, 256, 8),            # the first size does not fit: half of it
    (10_000, 0.01, 0.001, 1024, 128),  # gains shrink as the per-input cost takes over: stops under 5%
])
def test_tuning_picks_the_size_after_which_throughput_stops_growing(
        limit: int, fixed: float, per_input: float, ceiling: int, chosen: int) -> None:
    device = SimulatedDevice(limit, fixed, per_input)
    assert tune_max_batch(device.run, ceiling=ceiling, start=16, clock=device.clock) == chosen


def test_tuning_a_real_model_follows_its_own_measurements() -> None:
    model = load_model(parse_model_spec("imgembed-tiny"), "cpu", tower="image")
    size = model.input_size
    measured: dict[int, float | None] = {}
    chosen = tune_max_batch(lambda count: model.embed_pixels(torch.zeros(count, 3, size, size)), ceiling=64, start=4,
                            measured=measured)
    # The sizes tried are the doublings from 4, and the one chosen is the last that gained 5%.
    tried = sorted(measured)
    assert tried == [4 * 2**step for step in range(len(tried))] and tried[-1] <= 64
    expected = 4
    for smaller, larger in zip(tried, tried[1:]):
        if measured[larger] is None or measured[larger] < measured[smaller] * 1.05:  # type: ignore[operator]
            break
        expected = larger
    assert chosen == expected


def test_batched_images_equal_one_at_a_time() -> None:
    model = load_model(parse_model_spec("imgembed-tiny"), "cpu", tower="image")
    images = [torch.rand(3, model.input_size, model.input_size) for _ in range(6)]
    batcher: ForwardBatcher[torch.Tensor] = ForwardBatcher(model.embed_images, 4, "tiny")
    together = batcher.embed(images)
    alone = np.vstack([model.embed_images([image]) for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


ARENAS = """
import ctypes, sys, threading
from imgembed.worker.memory import limit_malloc_arenas
limit_malloc_arenas(int(sys.argv[1]))
barrier = threading.Barrier(4)
def work():
    barrier.wait()
    chunks = [bytearray(200_000) for _ in range(5)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()
"""

TRIM = """
from pathlib import Path
from imgembed.worker.memory import return_freed_memory
def own_kb():
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssAnon:"))
chunks = [bytearray(50_000) for _ in range(4000)]  # 200 MB in the heap, below glibc's mmap threshold
kept = chunks[::20]  # what stays in use pins the heap: freed pages between cannot be given back by themselves
del chunks
before = own_kb()
return_freed_memory()
print(before, own_kb())
"""


def _glibc_only() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings are glibc's")


def test_malloc_arenas_are_capped() -> None:
    """Four threads allocating at once get an arena each, unless the arenas are capped."""
    _glibc_only()
    import subprocess
    import sys

    def arenas(cap: int) -> int:
        stats = subprocess.run([sys.executable, "-c", ARENAS, str(cap)], capture_output=True, text=True, check=True)
        return sum(line.startswith("Arena ") for line in stats.stderr.splitlines())

    assert arenas(1) == 1
    assert arenas(0) >= 3


def test_freed_memory_goes_back_to_the_system() -> None:
    _glibc_only()
    import subprocess
    import sys

    before, after = map(int, subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert before > 150_000 and after < before / 2


def test_a_pass_that_fails_even_alone_hands_its_jobs_back() -> None:
    """Out of memory even for one input: no row is to blame, so no row fails; the jobs wait."""
    from imgembed.settings import load_settings
    from imgembed.worker.pipeline import ClaimResults, _embed

    def forward(items: list[int]) -> np.ndarray:
        raise torch.OutOfMemoryError("simulated device with no room at all")

    results = ClaimResults()
    _embed(ForwardBatcher(forward, 4, "full"), [1, 2, 3], [[10], [11, 13], [12]], results, load_settings({}))
    assert results.requeued == [10, 11, 13, 12] and results.failures == [] and results.done == []
    assert results.requeue_reason.startswith("waiting: embedding failed: OutOfMemoryError")
