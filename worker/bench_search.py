"""(5) of ``imgembed bench``: ``similar()`` latency and recall@10 at N stored vectors, half random
on the sphere and half in clusters, with and without a filter matching 1% of the rows."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
import psycopg

if TYPE_CHECKING:
    from worker.bench import BenchSize, Results


def search_figures(connection: psycopg.Connection, size: BenchSize, results: Results) -> None:
    """(5) similar() at N stored vectors: latency and recall@10 for several ef_search values."""
    dim, count = size.search_dim, size.search_vectors
    model_name = "bench-search"
    connection.execute("SELECT imgembed.register_model(%s, 'bench', NULL, %s)", (model_name, dim))
    connection.execute("CREATE TABLE bench_search (id bigint PRIMARY KEY, path text, category text)")
    connection.execute("INSERT INTO bench_search SELECT g, NULL, CASE WHEN g %% 100 = 0 THEN 'rare' ELSE 'common' END "
                       "FROM generate_series(0, %s - 1) g", (count,))
    connection.execute("SELECT imgembed.watch('bench_search', 'path', model => %s)", (model_name,))
    storage = connection.execute("SELECT imgembed.storage_table('bench_search')").fetchone()[0]  # type: ignore[index]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, dim))
    half = count // 2
    vectors = np.vstack([rng.normal(size=(count - half, dim)),
                         centres[rng.integers(0, 50, half)] + 0.5 * rng.normal(size=(half, dim))]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    connection.execute(f"DROP INDEX imgembed.{storage}_hnsw")
    load_started = time.perf_counter()
    with connection.cursor() as cursor, cursor.copy(
        f"COPY imgembed.{storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "vector", "bigint"])
        for i in range(count):
            copy.write_row((i, vectors[i], 0))
    connection.execute("SET maintenance_work_mem = '1GB'")
    build_started = time.perf_counter()
    connection.execute("SELECT imgembed.rebuild_index('bench_search')")
    build_seconds = time.perf_counter() - build_started
    connection.execute(f"ANALYZE imgembed.{storage}")
    results.add("search_load", {"vectors": count, "dim": dim, "copy_s": build_started - load_started, "hnsw_build_s": build_seconds},
                f"- loaded {count} x {dim}-dim vectors in {build_started - load_started:.1f} s; "
                f"HNSW build (halfvec, m=16, ef_construction=64) {build_seconds:.1f} s")
    # Half the queries from the random half, half from the clustered half: recall differs a lot.
    queries = (rng.choice(count - half, size.search_queries // 2, replace=False).tolist()
               + (count - half + rng.choice(half, size.search_queries - size.search_queries // 2, replace=False)).tolist())
    clustered = [key >= count - half for key in queries]

    def run(ef: int | None, exact: bool, filter_json: str | None) -> tuple[list[list[int]], list[float]]:
        hits, timings = [], []
        for key in queries:
            started = time.perf_counter()
            rows = connection.execute(
                "SELECT id FROM imgembed.similar('bench_search', %s::bigint, 10, ef_search => %s, exact => %s, filter => %s)",
                (key, ef, exact, filter_json)).fetchall()
            timings.append((time.perf_counter() - started) * 1000)
            hits.append([row[0] for row in rows])
        return hits, timings

    for label, filter_json in (("all rows", None), ("filter matching 1%", json.dumps({"category": "rare"}))):
        truth, exact_ms = run(None, True, filter_json)
        results.add(f"search_exact_{label}", {"p50_ms": np.percentile(exact_ms, 50)},
                    f"- similar(), {label}, exact scan: p50 {np.percentile(exact_ms, 50):.1f} ms, "
                    f"p95 {np.percentile(exact_ms, 95):.1f} ms")
        for ef in (40, 100, 200, 400):
            run(ef, False, filter_json)  # warm-up: the index pages these queries touch come into memory
            approx, timings = run(ef, False, filter_json)
            recalls = [len(set(a) & set(t)) / max(1, len(t)) for a, t in zip(approx, truth)]
            recall = float(np.mean(recalls))
            recall_clustered = float(np.mean([r for r, c in zip(recalls, clustered) if c]))
            recall_random = float(np.mean([r for r, c in zip(recalls, clustered) if not c]))
            full = np.mean([len(a) == 10 for a in approx])
            results.add(f"search_{label}_ef{ef}",
                        {"p50_ms": float(np.percentile(timings, 50)), "p95_ms": float(np.percentile(timings, 95)),
                         "recall_at_10": recall, "recall_clustered": recall_clustered, "recall_random": recall_random,
                         "full_k": float(full)},
                        f"- similar(), {label}, ef_search={ef}, warm: p50 {np.percentile(timings, 50):.1f} ms, "
                        f"p95 {np.percentile(timings, 95):.1f} ms, recall@10 {recall:.3f} (clustered-set queries "
                        f"{recall_clustered:.3f}, random-sphere queries {recall_random:.3f}), full k in {full:.0%} of queries")
