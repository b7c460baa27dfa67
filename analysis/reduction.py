"""Reduced models' fits, performed by a worker with scikit-learn: PCA of a table's vectors onto
fewer dimensions. The database projects with the fit (``sql/71_reductions.sql``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import psycopg

from imgembed.db import as_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reduction:
    mean: np.ndarray  # (source dims,)
    components: np.ndarray  # (dims, source dims), unit rows, largest variance first
    explained_variance: float  # share of the vectors' variance the dims keep


def fit_reduction(vectors: np.ndarray, dims: int, seed: int = 0) -> Reduction:
    """PCA of ``vectors`` onto ``dims`` dimensions."""
    from sklearn.decomposition import PCA

    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) <= dims:
        raise ValueError(f"a reduction to {dims} dimensions learns from more than {dims} embedded rows; "
                         f"the table has {len(vectors)}")
    pca = PCA(n_components=dims, random_state=seed).fit(vectors)
    return Reduction(mean=pca.mean_, components=pca.components_,
                     explained_variance=float(np.sum(pca.explained_variance_ratio_)))


def project(reduction: Reduction, vectors: np.ndarray) -> np.ndarray:
    """What the database stores for ``vectors``: their coordinates along the components, as unit
    vectors."""
    coordinates = (np.asarray(vectors, dtype=np.float64) - reduction.mean) @ reduction.components.T
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
        "SELECT imgembed.finish_reduction(%s, %s, %s, %s, %s)",
        (model_id, _vector_text(result.mean), [_vector_text(row) for row in result.components], len(rows),
         result.explained_variance),
    )
    log.info("reduced model %s: %s dimensions from %s vectors keep %.3f of their variance",
             model_id, dims, len(rows), result.explained_variance)
    return {"model_id": model_id, "status": "done", "fitted_rows": len(rows),
            "explained_variance": result.explained_variance}
