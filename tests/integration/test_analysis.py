"""Clusters, anomaly scores, prototypes and maps, checked against scikit-learn."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from sklearn.neighbors import NearestCentroid, NearestNeighbors

from imgembed.analysis.clustering import fit_clusters
from imgembed.models.registry import register_model
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, Services, wait_for
from tests.integration.test_search_sql import load_vectors, unit

DIM = 64


def grouped_vectors(groups: int, per_group: int, seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(groups, DIM)))
    truth = np.repeat(np.arange(groups), per_group)
    return unit(centres[truth] + spread * rng.normal(size=(len(truth), DIM))), truth


def test_fit_clusters_recovers_known_groups() -> None:
    vectors, truth = grouped_vectors(5, 40)
    for method in ("kmeans", "minibatch_kmeans"):
        result = fit_clusters(vectors, None, method)
        assert len(result.centres) == 5, method
        assert adjusted_rand_score(truth, result.labels) >= 0.95
    dense = fit_clusters(vectors, None, "hdbscan")
    assert adjusted_rand_score(truth[dense.labels >= 0], dense.labels[dense.labels >= 0]) >= 0.95


@pytest.fixture
def grouped_table(db: psycopg.Connection) -> tuple[psycopg.Connection, np.ndarray, np.ndarray]:
    vectors, truth = grouped_vectors(4, 50, seed=1)
    db.execute("CREATE TABLE parts (id integer PRIMARY KEY, photo bytea, kind text, ok boolean)")
    image = random_shapes(1, seed=1)[0].png_bytes()
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO parts VALUES (%s, %s, %s, %s)",
                           [(i, image, f"group{truth[i]}", bool(truth[i] == 0 and i % 5 != 0)) for i in range(len(truth))])
    db.execute("SELECT imgembed.watch('parts', 'photo', label_column => 'kind')")
    load_vectors(db, "public.parts", list(range(len(truth))), vectors)
    db.execute("DELETE FROM imgembed.intake")  # vectors were written directly: nothing for workers to embed
    return db, vectors, truth


def test_cluster_runs_on_a_worker(grouped_table: tuple[psycopg.Connection, np.ndarray, np.ndarray], services: Services) -> None:
    db, vectors, truth = grouped_table
    services.start("dispatch")
    services.start("worker")
    result = subprocess.run([sys.executable, "-m", "imgembed", "cluster", "parts", "--wait", "--timeout", "180"],
                            cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    run_id, k, quality = db.execute("SELECT id, k, quality FROM imgembed.cluster_run WHERE status = 'done'").fetchone()
    assert k == 4 and quality > 0.5
    members = dict(db.execute("SELECT key::int, cluster FROM imgembed.cluster_member WHERE run_id = %s", (run_id,)).fetchall())
    assert len(members) == len(truth)
    assert adjusted_rand_score(truth, [members[i] for i in range(len(truth))]) >= 0.95
    summary = db.execute("SELECT cluster, size, medoid_key, label_mix FROM imgembed.cluster_summary WHERE run_id = %s",
                         (run_id,)).fetchall()
    assert sorted(row[1] for row in summary) == [50, 50, 50, 50]
    assert all(len(row[3]) == 1 for row in summary)  # each cluster holds one group's label
    # One table's members and summary with keys in its own type (integer), the latest run by default.
    typed = db.execute("SELECT run, key, cluster FROM imgembed.cluster_member('parts', NULL::integer)").fetchall()
    assert {key: cluster for _, key, cluster in typed} == members and {run for run, _, _ in typed} == {run_id}
    medoids = db.execute("SELECT medoid_key FROM imgembed.cluster_summary('parts', NULL::integer)").fetchall()
    assert sorted(row[0] for row in medoids) == sorted(int(row[2]) for row in summary)
    with pytest.raises(psycopg.Error, match="no finished clustering run with id 12345"):
        db.execute("SELECT * FROM imgembed.cluster_member('parts', NULL::integer, 12345)")
    with pytest.raises(psycopg.Error, match="hdbscan finds the number of clusters itself"):
        db.execute("SELECT imgembed.cluster('parts', 8, 'hdbscan')")

    # A row inserted after the run gets its cluster from the nearest centre.
    db.execute("INSERT INTO parts VALUES (999, 'x', NULL, NULL)")
    load_vectors(db, "public.parts", [999], unit(vectors[[60]] + 0.01))
    cluster, distance = db.execute("SELECT cluster, distance FROM imgembed.nearest_cluster('parts', 999)").fetchone()
    assert cluster == members[60] and distance < 0.2

    # More clusters than rows: the run fails with a reason that says so, and nothing is stored.
    failing = db.execute("SELECT imgembed.cluster('parts', 500)").fetchone()[0]
    wait_for(lambda: db.execute("SELECT status FROM imgembed.cluster_run WHERE id = %s", (failing,)).fetchone()[0]
             in ("done", "failed"), 120, "the oversized run to end")
    status, error = db.execute("SELECT status, error FROM imgembed.cluster_run WHERE id = %s", (failing,)).fetchone()
    assert status == "failed" and "k=500" in error and "201" in error
    assert db.execute("SELECT count(*) FROM imgembed.cluster_member WHERE run_id = %s", (failing,)).fetchone()[0] == 0


def test_anomaly_scores_equal_scikit_learn(grouped_table: tuple[psycopg.Connection, np.ndarray, np.ndarray]) -> None:
    db, vectors, truth = grouped_table
    db.execute("SELECT imgembed.set_known_good('parts', good_column => 'ok')")
    good = np.array([i for i in range(len(truth)) if truth[i] == 0 and i % 5 != 0])
    neighbours = NearestNeighbors(metric="cosine", algorithm="brute").fit(vectors[good])
    for key in (0, 7, 55, 120, 199):  # unmarked good-group rows and others
        distances, indices = neighbours.kneighbors(vectors[[key]], n_neighbors=6)
        expected = [d for d, i in zip(distances[0], indices[0]) if good[i] != key][:5]
        got = db.execute("SELECT imgembed.anomaly_score('parts', %s, 5, exact => true)", (key,)).fetchone()[0]
        assert got == pytest.approx(np.mean(expected), abs=1e-5)

    threshold = db.execute("SELECT imgembed.calibrate_anomalies('parts')").fetchone()[0]
    stored = db.execute("SELECT threshold, quantile, good_rows FROM imgembed.anomaly_threshold").fetchone()
    assert stored == (pytest.approx(threshold), 0.99, len(good))
    flagged = dict(db.execute("SELECT key::int, is_anomaly FROM imgembed.anomalies WHERE table_name = 'public.parts'").fetchall())
    assert set(flagged) == set(range(len(truth))) - set(good.tolist())
    assert all(flagged[i] for i in flagged if truth[i] != 0)
    typed = db.execute("SELECT key, is_anomaly FROM imgembed.anomalies('parts', NULL::integer)").fetchall()
    assert dict(typed) == flagged
    with pytest.raises(psycopg.Error, match="boolean"):
        db.execute("SELECT imgembed.set_known_good('parts', good_column => 'kind')")


def test_prototypes_equal_nearest_centroid(grouped_table: tuple[psycopg.Connection, np.ndarray, np.ndarray]) -> None:
    db, vectors, truth = grouped_table
    labelled = [i for i in range(len(truth)) if i % 10 == 0]  # five examples per group: few-shot
    db.execute("UPDATE parts SET kind = NULL WHERE id % 10 <> 0")
    centroid = NearestCentroid(metric="euclidean").fit(vectors[labelled], [f"group{truth[i]}" for i in labelled])
    queries = [i for i in range(len(truth)) if i % 10 != 0][::7]
    expected = centroid.predict(vectors[queries])
    for query, label in zip(queries, expected):
        got, distance, margin = db.execute("SELECT * FROM imgembed.classify_prototype('parts', %s)", (query,)).fetchone()
        assert got == label
        assert margin > 0
        centre = vectors[[i for i in labelled if f"group{truth[i]}" == label]].mean(axis=0)
        assert distance == pytest.approx(float(np.linalg.norm(vectors[query] - centre)), abs=1e-5)


def test_map_png_html_and_stored_coordinates(
    grouped_table: tuple[psycopg.Connection, np.ndarray, np.ndarray], services: Services, tmp_path: Path
) -> None:
    db, _, truth = grouped_table
    out = tmp_path / "parts.png"
    for method in ("pca", "tsne"):
        result = subprocess.run([sys.executable, "-m", "imgembed", "map", "parts", "--method", method, "--out", str(out)],
                                cwd=REPO, env=services.env(), capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
        assert db.execute("SELECT count(*) FROM imgembed.projection WHERE method = %s", (method,)).fetchone()[0] == len(truth)
        typed = db.execute("SELECT key, made_with FROM imgembed.projection('parts', NULL::integer)").fetchall()
        assert [key for key, _ in typed] == list(range(len(truth))) and {made for _, made in typed} == {method}
    assert db.execute("SELECT count(*) FROM imgembed.projection('parts', NULL::integer, 'pca')").fetchone()[0] == len(truth)
    with pytest.raises(psycopg.Error, match="has no map made with umap"):
        db.execute("SELECT * FROM imgembed.projection('parts', NULL::integer, 'umap')")
    with Image.open(out) as picture:
        assert picture.size == (1400 + 260, 1400)
    page = out.with_suffix(".html")
    assert page.exists() and page.read_text().count('class="p"') == len(truth)
    # The page's script parses (node), and runs without an error in a browser where one is installed.
    scripts = re.findall(r"<script>(.*?)</script>", page.read_text(), flags=re.S)
    assert scripts
    node = shutil.which("node")
    assert node, "node checks the map page's script: install Node.js"
    script_file = tmp_path / "page.js"
    script_file.write_text("\n".join(scripts))
    checked = subprocess.run([node, "--check", str(script_file)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        shot = tmp_path / "page.png"
        run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                              "--v=0", f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
        assert shot.exists()
        assert "Uncaught" not in run.stderr


@pytest.mark.slow
def test_anomalies_with_the_shapes_model(db: psycopg.Connection, services: Services) -> None:
    """Quality control from good examples only: good = red circles, anything else is a defect."""
    register_model(db, "imgembed-shapes")
    shapes = random_shapes(2500, seed=31)
    red_circles = [s for s in shapes if s.colour == "red" and s.shape == "circle"]
    others = [s for s in shapes if not (s.colour == "red" and s.shape == "circle")][:120]
    rows = [(i, s.png_bytes(), i < 70) for i, s in enumerate(red_circles)]  # 70 marked good, the rest held out
    rows += [(1000 + i, s.png_bytes(), False) for i, s in enumerate(others)]
    db.execute("CREATE TABLE line (id integer PRIMARY KEY, photo bytea, good boolean)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO line VALUES (%s, %s, %s)", rows)
    db.execute("SELECT imgembed.watch('line', 'photo', model => 'imgembed-shapes')")
    db.execute("SELECT imgembed.set_known_good('line', good_column => 'good')")
    services.extra_env["IMGEMBED_MODEL"] = "imgembed-shapes"
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT embedded = %s FROM imgembed.status WHERE table_name = 'public.line'",
                                (len(rows),)).fetchone()[0], 240, "line embedded")
    db.execute("SELECT imgembed.calibrate_anomalies('line')")
    scored = db.execute("SELECT key::int, score, is_anomaly FROM imgembed.anomalies WHERE table_name = 'public.line'").fetchall()
    held_out_good = [row for row in scored if row[0] < 1000]
    assert len(held_out_good) == len(red_circles) - 70 and len(scored) == len(rows) - 70
    auc = roc_auc_score([row[0] >= 1000 for row in scored], [row[1] for row in scored])
    flagged_good = np.mean([row[2] for row in held_out_good])
    print(f"ROC AUC {auc:.3f}; held-out good rows flagged: {flagged_good:.3f}")
    assert auc >= 0.95
    assert flagged_good <= 0.05


def test_a_good_label_holding_percent_signs_is_data(grouped_table: tuple[psycopg.Connection, np.ndarray, np.ndarray]
                                                    ) -> None:
    """Label values go into the search as data: '%' in one is neither a format directive nor SQL."""
    db, vectors, truth = grouped_table
    good_label = "100% good; it's %s %1$s"
    db.execute("UPDATE parts SET kind = %s WHERE kind = 'group0'", (good_label,))
    db.execute("SELECT imgembed.set_known_good('parts', good_label => %s)", (good_label,))
    good = np.flatnonzero(truth == 0)
    neighbours = NearestNeighbors(metric="cosine", algorithm="brute").fit(vectors[good])
    for key in (3, 120):
        distances, indices = neighbours.kneighbors(vectors[[key]], n_neighbors=6)
        expected = [d for d, i in zip(distances[0], indices[0]) if good[i] != key][:5]
        for exact in (True, False):
            got = db.execute("SELECT imgembed.anomaly_score('parts', %s, 5, exact => %s)", (key, exact)).fetchone()[0]
            assert got == pytest.approx(np.mean(expected), abs=1e-3 if not exact else 1e-5)
