"""What a benchmark run measures, at which sizes, and how its figures are written down."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


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


FIGURES = (1, 2, 3, 4, 5, 6, 8, 9)  # (7) is measured with (2) on a GPU


def write_results(results: Results, out: Path) -> Results:
    results.lines += ["", "```json", json.dumps(results.figures, indent=2, default=float), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(results.lines))
    print(f"\nwritten to {out}")
    return results
