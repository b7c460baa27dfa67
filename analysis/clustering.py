"""Clustering runs, performed by a worker with scikit-learn: k-means, mini-batch k-means or
HDBSCAN; k chosen by silhouette (cosine) when the run leaves it open."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from imgembed.db import as_array

log = logging.getLogger(__name__)

K_SEARCH_MAX = 20
SILHOUETTE_SAMPLE = 5000


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # cluster per row, -1 for noise (HDBSCAN)
    centres: dict[int, np.ndarray]  # unit vectors
    quality: float  # silhouette (cosine); NaN with fewer than 2 clusters
    params: dict[str, object]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _silhouette(vectors: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    kept = labels >= 0
    if len(set(labels[kept])) < 2:
        return float("nan")
    return float(silhouette_score(vectors[kept], labels[kept], metric="cosine",
                                  sample_size=min(SILHOUETTE_SAMPLE, int(kept.sum())), random_state=seed))


def _kmeans(vectors: np.ndarray, k: int, method: str, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if method == "minibatch_kmeans":
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3).fit_predict(vectors)
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(vectors)


def fit_clusters(vectors: np.ndarray, k: int | None, method: str, seed: int = 0) -> Clustering:
    vectors = _unit(np.asarray(vectors, dtype=np.float32))
    if len(vectors) < 3:
        raise ValueError(f"clustering needs at least 3 embedded rows, found {len(vectors)}")
    params: dict[str, object] = {"method": method}
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        min_size = max(5, len(vectors) // 50)
        labels = HDBSCAN(min_cluster_size=min_size, metric="cosine", copy=True).fit_predict(vectors)
        params["min_cluster_size"] = min_size
    elif k is not None:
        if not 2 <= k < len(vectors):
            raise ValueError(f"k={k} clusters need k >= 2 and more embedded rows than k; the table has {len(vectors)}")
        labels = _kmeans(vectors, k, method, seed)
    else:
        scores = {}
        for candidate in range(2, min(K_SEARCH_MAX, len(vectors) - 1) + 1):
            scores[candidate] = _silhouette(vectors, _kmeans(vectors, candidate, method, seed), seed)
        best = max(scores, key=lambda candidate: scores[candidate])
        params["silhouette_by_k"] = {str(candidate): round(score, 4) for candidate, score in scores.items()}
        labels = _kmeans(vectors, best, method, seed)
    centres = {int(c): _unit(vectors[labels == c].mean(axis=0)) for c in sorted(set(labels.tolist())) if c >= 0}
    return Clustering(labels=labels, centres=centres, quality=_silhouette(vectors, labels, seed), params=params)


def run_clustering(connection: psycopg.Connection, run_id: int, seed: int = 0) -> dict[str, object]:
    method, k_requested = connection.execute(
        "SELECT method, k_requested FROM imgembed.cluster_run_spec(%s)", (run_id,)
    ).fetchone()  # type: ignore[misc]
    rows = connection.execute("SELECT key, embedding FROM imgembed.cluster_input(%s)", (run_id,)).fetchall()
    keys = [row[0] for row in rows]
    try:
        result = fit_clusters(np.stack([as_array(row[1]) for row in rows]) if rows else np.zeros((0, 1)),
                              k_requested, method, seed)
    except ValueError as error:
        connection.execute("SELECT imgembed.fail_cluster_run(%s, %s)", (run_id, str(error)))
        return {"run_id": run_id, "status": "failed", "error": str(error)}
    vectors = _unit(np.stack([as_array(row[1]) for row in rows]))
    distances = np.array([
        1.0 - float(vectors[i] @ result.centres[label]) if label >= 0 else float("nan")
        for i, label in enumerate(result.labels.tolist())
    ])
    clusters = sorted(result.centres)
    medoids = [keys[int(np.nanargmin(np.where(result.labels == c, distances, np.nan)))] for c in clusters]
    sizes = [int((result.labels == c).sum()) for c in clusters]
    connection.execute(
        "SELECT imgembed.finish_cluster_run(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (run_id, len(clusters), None if np.isnan(result.quality) else result.quality, keys,
         [int(x) for x in result.labels], [None if np.isnan(d) else float(d) for d in distances], clusters,
         ["[" + ",".join(f"{x:.7g}" for x in result.centres[c]) + "]" for c in clusters], sizes, medoids,
         Jsonb(result.params)),
    )
    log.info("cluster run %s: %s clusters over %s rows, silhouette %.3f", run_id, len(clusters), len(keys), result.quality)
    return {"run_id": run_id, "status": "done", "k": len(clusters), "quality": result.quality}
