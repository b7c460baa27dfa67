"""The forward batcher: results stay with their requests, waiting requests merge, a pass that runs
out of memory is split, and batch-size tuning stops where throughput stops growing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from imgembed.models.names import parse_model_spec
from imgembed.worker.batcher import ForwardBatcher, tune_max_batch
from imgembed.worker.embedding import load_model
from imgembed.worker.memory import limit_malloc_arenas, return_freed_memory


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


def test_tuning_stops_at_out_of_memory_and_at_the_ceiling() -> None:
    def fits_up_to(limit: int):
        def run(size: int) -> None:
            if size > limit:
                raise torch.OutOfMemoryError("simulated")
            threading.Event().wait(0.02)  # a fixed cost per pass: larger batches always gain
        return run

    assert tune_max_batch(fits_up_to(100), ceiling=1024, start=16) == 64
    assert tune_max_batch(fits_up_to(10_000), ceiling=256, start=16) == 256
    assert tune_max_batch(fits_up_to(8), ceiling=256, start=16) == 8


def test_tuning_a_real_model_picks_a_measured_size() -> None:
    model = load_model(parse_model_spec("imgembed-tiny"), "cpu", tower="image")
    size = model.input_size
    chosen = tune_max_batch(lambda count: model.embed_pixels(torch.zeros(count, 3, size, size)), ceiling=64, start=4)
    assert chosen in {4, 8, 16, 32, 64}


def test_batched_images_equal_one_at_a_time() -> None:
    model = load_model(parse_model_spec("imgembed-tiny"), "cpu", tower="image")
    images = [torch.rand(3, model.input_size, model.input_size) for _ in range(6)]
    batcher: ForwardBatcher[torch.Tensor] = ForwardBatcher(model.embed_images, 4, "tiny")
    together = batcher.embed(images)
    alone = np.vstack([model.embed_images([image]) for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_allocator_calls_are_safe() -> None:
    limit_malloc_arenas(0)
    limit_malloc_arenas(8)
    return_freed_memory()
