"""Reduced models' fits, performed by a worker with scikit-learn: PCA of a table's vectors onto
fewer dimensions, keeping their mean's direction. The database projects with the fit
(``sql/71_reductions.sql``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import psycopg

from imgembed.db import as_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reduction:
    axes: np.ndarray  # (dims, source dims): orthonormal rows
    explained_variance: float  # share of the vectors' variance around their mean that the axes keep


def fit_reduction(vectors: np.ndarray, dims: int, seed: int = 0) -> Reduction:
    """Axes onto which ``vectors`` keep their cosine similarities best in ``dims`` dimensions: the
    first dims - 1 principal components (PCA), and the direction of the vectors' mean that they
    leave out. Embeddings share a large common part (CLIP's vectors are often at cosine 0.5 or
    more of each other): PCA centres it away, and cosine similarity of centred projections ranks
    rows differently from the source model. Kept as an axis of its own, it ranks them the same.
    When the mean is (nearly) within the components, the next component takes its place."""
    from sklearn.decomposition import PCA

    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) <= dims:
        raise ValueError(f"a reduction to {dims} dimensions learns from more than {dims} embedded rows; "
                         f"the table has {len(vectors)}")
    pca = PCA(n_components=dims, random_state=seed).fit(vectors)
    components = pca.components_[: dims - 1]
    left_out = pca.mean_ - components.T @ (components @ pca.mean_)
    if np.linalg.norm(left_out) > 1e-6 * max(float(np.linalg.norm(pca.mean_)), 1e-12):
        axes = np.vstack([components, left_out / np.linalg.norm(left_out)])
        kept = float(np.sum(pca.explained_variance_ratio_[: dims - 1]))
    else:
        axes, kept = pca.components_, float(np.sum(pca.explained_variance_ratio_))
    return Reduction(axes=axes, explained_variance=kept)


def project(reduction: Reduction, vectors: np.ndarray) -> np.ndarray:
    """What the database stores for ``vectors``: their coordinates along the axes, as unit vectors."""
    coordinates = np.asarray(vectors, dtype=np.float64) @ reduction.axes.T
    return coordinates / np.maximum(np.linalg.norm(coordinates, axis=-1, keepdims=True), 1e-12)


def _vector_text(values: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.9g}" for x in values) + "]"


def run_reduction(connection: psycopg.Connection, model_id: int, seed: int = 0) -> dict[str, object]:
    """Fit one reduced model (claimed by a dispatcher) and store the fit: the database then
    projects every vector of the tables it is attached to."""
    _method, dims = connection.execute(
        "SELECT method, dims FROM imgembed.reduction_spec(%s)", (model_id,)).fetchone()  # type: ignore[misc]
    try:
        rows = connection.execute("SELECT embedding FROM imgembed.reduction_input(%s)", (model_id,)).fetchall()
        result = fit_reduction(np.stack([as_array(row[0]) for row in rows]) if rows else np.zeros((0, 1)), dims, seed)
    except (ValueError, psycopg.errors.NoDataFound) as error:
        connection.execute("SELECT imgembed.fail_reduction(%s, %s)", (model_id, str(error).split("\n")[0]))
        return {"model_id": model_id, "status": "failed", "error": str(error)}
    connection.execute(
        "SELECT imgembed.finish_reduction(%s, %s, %s, %s)",
        (model_id, [_vector_text(axis) for axis in result.axes], len(rows), result.explained_variance),
    )
    log.info("reduced model %s: %s dimensions from %s vectors keep %.3f of their variance",
             model_id, dims, len(rows), result.explained_variance)
    return {"model_id": model_id, "status": "done", "fitted_rows": len(rows),
            "explained_variance": result.explained_variance}
