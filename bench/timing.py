"""How the benchmark times a forward pass: one warm-up, then passes until enough images and
enough seconds have gone by."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def images_per_s(embed: Callable[[Any], object], pixels: Any, batch_size: int, images: int, seconds: float) -> float:
    """``embed(pixels)`` (a batch of ``batch_size``) run for at least ``images`` images and
    ``seconds`` seconds, after one warm-up pass: images per second."""
    embed(pixels)
    started = time.perf_counter()
    done = 0
    while done < images or time.perf_counter() - started < seconds:
        embed(pixels)  # returns the vectors on the CPU: the device has finished
        done += batch_size
    return done / (time.perf_counter() - started)
