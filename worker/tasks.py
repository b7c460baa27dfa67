"""Celery task bodies. Each worker process builds its runtime (connection, models, decode
threads) on its first task."""

from __future__ import annotations

from uuid import UUID

from celery import Celery

from imgembed.celery_app import TASK_CLUSTER, TASK_EMBED_BATCH, TASK_REDUCE
from imgembed.settings import load_settings
from imgembed.worker.pipeline import run_claim
from imgembed.worker.process_state import WorkerState

_runtime: WorkerState | None = None


def runtime() -> WorkerState:
    global _runtime
    if _runtime is None:
        _runtime = WorkerState(load_settings())
    return _runtime


def embed_batch(claim_id: str, model_name: str, job_ids: list[int]) -> dict[str, object]:
    """Embed one claimed batch. ``job_ids`` is informational: the claim decides what is owned."""
    del job_ids
    return run_claim(runtime(), UUID(claim_id), model_name).as_dict()


def cluster(run_id: int) -> dict[str, object]:
    """Perform one clustering run (claimed by a dispatcher) with scikit-learn."""
    from imgembed.analysis.clustering import run_clustering

    return run_clustering(runtime().connection(), run_id)


def reduce(model_id: int) -> dict[str, object]:
    """Fit one reduced model (imgembed.reduce, claimed by a dispatcher) with scikit-learn."""
    from imgembed.analysis.reduction import run_reduction

    return run_reduction(runtime().connection(), model_id)


def register_worker_tasks(app: Celery) -> None:
    """Attach the task implementations to the app (only worker processes call this)."""
    app.task(name=TASK_EMBED_BATCH, acks_late=True, reject_on_worker_lost=True)(embed_batch)
    app.task(name=TASK_CLUSTER, acks_late=True, reject_on_worker_lost=True)(cluster)
    app.task(name=TASK_REDUCE, acks_late=True, reject_on_worker_lost=True)(reduce)
