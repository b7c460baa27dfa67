"""(5) of ``imgembed bench``: ``similar()`` latency and recall@10 at N stored vectors, half random
on the sphere and half in clusters, stored in random order, with and without a filter matching 1%
of the rows, for the index imgembed builds by default and for one built for recall."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import psycopg

from imgembed.bench.results import BenchSize, Results

# (m, ef_construction) of each HNSW build measured. The first is pgvector's default, which
# imgembed.watch() uses: cheap to keep up while vectors arrive. The second is the build for recall
# that the README recommends for evenly spread vectors: about 25 times the build time and 1.5
# times the size, for several times the recall of random-sphere queries (1,000 is the largest
# ef_construction pgvector takes).
# A build inserts rows in the table's physical order, and for evenly spread vectors that order
# changes recall a lot (README: Index builds). _load_vectors therefore writes the rows in random
# order, as they would arrive in a real table, rather than the evenly spread half first.
INDEX_BUILDS: tuple[tuple[int, int], ...] = ((16, 64), (48, 1000))
EF_SEARCH_VALUES = (30, 40, 100, 400)  # at least the 20 candidates similar() re-ranks for k=10
ALL_ROWS, FILTERED = "all rows", "filter matching 1%"
RARE_FILTER = '{"category": "rare"}'  # jsonb filter matching 1% of the rows

Searcher = Callable[[int | None, bool, str | None], tuple[list[list[int]], list[float]]]


def search_figures(connection: psycopg.Connection, size: BenchSize, results: Results) -> None:
    """(5) similar() at N stored vectors: latency and recall@10 for several ef_search values."""
    dim, count = size.search_dim, size.search_vectors
    load_started = time.perf_counter()
    storage = _load_vectors(connection, dim, count)
    load_seconds = time.perf_counter() - load_started
    table_mb = connection.execute(f"SELECT pg_table_size('{storage}') / 1e6").fetchone()[0]  # type: ignore[index]
    results.add("search_load", {"vectors": count, "dim": dim, "copy_s": load_seconds, "table_mb": float(table_mb)},
                f"- loaded {count} x {dim}-dim vectors in {load_seconds:.1f} s ({table_mb:.0f} MB; searches re-rank "
                "their candidates with these full-precision vectors)")
    rng = np.random.default_rng(1)
    half = count // 2
    # Half the queries from the random half, half from the clustered half: recall differs a lot.
    queries = (rng.choice(count - half, size.search_queries // 2, replace=False).tolist()
               + (count - half + rng.choice(half, size.search_queries - size.search_queries // 2, replace=False)).tolist())
    clustered = [key >= count - half for key in queries]
    search = _searcher(connection, queries)
    truths: dict[str, list[list[int]]] = {}
    for label, filter_json in ((ALL_ROWS, None), (FILTERED, RARE_FILTER)):
        truths[label], exact_ms = search(None, True, filter_json)
        results.add(f"search_exact_{label}", {"p50_ms": np.percentile(exact_ms, 50)},
                    f"- similar(), {label}, exact scan: p50 {np.percentile(exact_ms, 50):.1f} ms, "
                    f"p95 {np.percentile(exact_ms, 95):.1f} ms")
    connection.execute("SET maintenance_work_mem = '1GB'")  # the graph fits: the build stays in memory
    for number, (m, ef_construction) in enumerate(INDEX_BUILDS):
        build_started = time.perf_counter()
        connection.execute("SELECT imgembed.rebuild_index('bench_search', m => %s, ef_construction => %s)",
                           (m, ef_construction))
        build_seconds = time.perf_counter() - build_started
        connection.execute(f"ANALYZE {storage}")
        index_mb = connection.execute(f"SELECT pg_relation_size('{storage}_hnsw') / 1e6").fetchone()[0]  # type: ignore[index]
        build = f"m={m}, ef_construction={ef_construction}"
        suffix = "" if number == 0 else f"_m{m}_efc{ef_construction}"
        results.add(f"search_build{suffix}", {"m": m, "ef_construction": ef_construction, "build_s": build_seconds,
                                              "index_mb": float(index_mb)},
                    f"- HNSW build ({'default' if number == 0 else 'for recall'}: halfvec, {build}) "
                    f"{build_seconds:.1f} s, {index_mb:.0f} MB")
        for ef in EF_SEARCH_VALUES:
            _measure(results, search, f"search_{ALL_ROWS}{suffix}_ef{ef}", f"{ALL_ROWS}, {build}, ef_search={ef}",
                     ef, None, truths[ALL_ROWS], clustered)
        if number == 0:
            _filtered_figures(connection, results, search, truths[FILTERED], clustered, build)
            _policy_figures(connection, results, search, truths[ALL_ROWS], clustered, build)


def _filtered_figures(connection: psycopg.Connection, results: Results, search: Searcher, truth: list[list[int]],
                      clustered: list[bool], build: str) -> None:
    """The 1% filter as similar() answers it (its 1,000 rows are at most imgembed.exact_scan_rows, so
    it scans them exactly), then forced through the index (pgvector's iterative scan)."""
    _measure(results, search, f"search_{FILTERED}", f"{FILTERED}, as it answers by default (an exact scan of "
             "the matching rows: they are at most imgembed.exact_scan_rows)", None, RARE_FILTER, truth, clustered)
    connection.execute("SET imgembed.exact_scan_rows = 0")
    try:
        for ef in EF_SEARCH_VALUES[:2]:
            _measure(results, search, f"search_{FILTERED}_index_ef{ef}",
                     f"{FILTERED}, through the index (imgembed.exact_scan_rows = 0), {build}, ef_search={ef}",
                     ef, RARE_FILTER, truth, clustered)
    finally:
        connection.execute("RESET imgembed.exact_scan_rows")


def _policy_figures(connection: psycopg.Connection, results: Results, search: Searcher, truth: list[list[int]],
                    clustered: list[bool], build: str) -> None:
    """What reading as a role costs, at ef_search 40: the figures above are a superuser's, who
    passes row-level security by; a reader's searches check every candidate against the watched
    table (the vector table's policy), and that table's own policy with it when it has one."""
    connection.execute("DO $$ BEGIN CREATE ROLE bench_reader NOLOGIN IN ROLE imgembed_reader; "
                       "EXCEPTION WHEN duplicate_object THEN END $$")
    connection.execute("GRANT SELECT ON bench_search TO bench_reader")
    cases = (("reader", "as a reader role (the vector table's policy)", False),
             ("reader_policy", "as a reader role, bench_search with a row-level policy of its own", True))
    try:
        for suffix, what, own_policy in cases:
            if own_policy:
                connection.execute("ALTER TABLE bench_search ENABLE ROW LEVEL SECURITY")
                connection.execute("CREATE POLICY tenant ON bench_search FOR SELECT USING (category <> 'hidden')")
            connection.execute("SET ROLE bench_reader")
            try:
                _measure(results, search, f"search_{ALL_ROWS}_ef40_{suffix}", f"{ALL_ROWS}, {build}, ef_search=40, {what}",
                         40, None, truth, clustered)
            finally:
                connection.execute("RESET ROLE")
    finally:
        connection.execute("DROP POLICY IF EXISTS tenant ON bench_search")
        connection.execute("ALTER TABLE bench_search DISABLE ROW LEVEL SECURITY")


def _load_vectors(connection: psycopg.Connection, dim: int, count: int) -> str:
    """A watched table of ``count`` rows (1% of them in category 'rare') whose vectors are written
    directly, in random order: half random on the sphere (keys below count/2), half around 50
    centres. Returns the vector table's name."""
    model_name = "bench-search"
    connection.execute("SELECT imgembed.register_model(%s, 'bench', NULL, %s)", (model_name, dim))
    connection.execute("CREATE TABLE bench_search (id bigint PRIMARY KEY, path text, category text)")
    connection.execute("INSERT INTO bench_search SELECT g, NULL, CASE WHEN g %% 100 = 0 THEN 'rare' ELSE 'common' END "
                       "FROM generate_series(0, %s - 1) g", (count,))
    connection.execute("SELECT imgembed.watch('bench_search', 'path', model => %s)", (model_name,))
    storage: str = connection.execute("SELECT imgembed.storage_table('bench_search')").fetchone()[0]  # type: ignore[index]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, dim))
    half = count // 2
    vectors = np.vstack([rng.normal(size=(count - half, dim)),
                         centres[rng.integers(0, 50, half)] + 0.5 * rng.normal(size=(half, dim))]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    connection.execute(f"DROP INDEX {storage}_hnsw")  # built after the load, as the README advises
    with connection.cursor() as cursor, cursor.copy(
        f"COPY {storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "vector", "bigint"])
        for key in rng.permutation(count).tolist():
            copy.write_row((key, vectors[key], 0))
    # Both tables, as autovacuum would have by the time anyone searches them: without statistics
    # for bench_search, the planner answers a filtered search by scanning the matching rows, and
    # the figures "through the index" would depend on whether autovacuum had come by yet.
    connection.execute(f"ANALYZE bench_search, {storage}")
    return storage


def _searcher(connection: psycopg.Connection, queries: list[int]) -> Searcher:
    def search(ef: int | None, exact: bool, filter_json: str | None) -> tuple[list[list[int]], list[float]]:
        """similar() for every query: the keys found, and each call's time in ms."""
        found, timings = [], []
        for key in queries:
            started = time.perf_counter()
            rows = connection.execute(
                "SELECT id FROM imgembed.similar('bench_search', %s::bigint, 10, ef_search => %s, exact => %s, filter => %s)",
                (key, ef, exact, filter_json)).fetchall()
            timings.append((time.perf_counter() - started) * 1000)
            found.append([row[0] for row in rows])
        return found, timings
    return search


def _measure(results: Results, search: Searcher, key: str, what: str, ef: int | None, filter_json: str | None,
             truth: list[list[int]], clustered: list[bool]) -> None:
    """Latency and recall@10 of one setting, warm: a first round brings the index pages it touches
    into memory, the second is measured."""
    search(ef, False, filter_json)
    found, timings = search(ef, False, filter_json)
    recalls = [len(set(a) & set(t)) / max(1, len(t)) for a, t in zip(found, truth)]
    recall = float(np.mean(recalls))
    recall_clustered = float(np.mean([r for r, c in zip(recalls, clustered) if c]))
    recall_random = float(np.mean([r for r, c in zip(recalls, clustered) if not c]))
    full = float(np.mean([len(a) == 10 for a in found]))
    p50, p95 = float(np.percentile(timings, 50)), float(np.percentile(timings, 95))
    results.add(key, {"p50_ms": p50, "p95_ms": p95, "recall_at_10": recall, "recall_clustered": recall_clustered,
                      "recall_random": recall_random, "full_k": full},
                f"- similar(), {what}, warm: p50 {p50:.1f} ms, p95 {p95:.1f} ms, recall@10 {recall:.3f} "
                f"(clustered-set queries {recall_clustered:.3f}, random-sphere queries {recall_random:.3f}), "
                f"full k in {full:.0%} of queries")
