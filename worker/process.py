"""A worker process: allocator and OpenMP settings made before torch loads, the model loaded
before the first task, a heartbeat, and Celery's worker loop, started again if it stops on its own."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Literal

from imgembed.settings import Settings, require_database_url

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, preload: bool = True) -> None:
    """Serve embedding tasks from the settings' queue until a signal asks the worker to stop."""
    from imgembed.worker.memory import limit_malloc_arenas
    from imgembed.worker.openmp import use_wait_policy

    limit_malloc_arenas(settings.malloc_arenas)  # before any thread starts
    use_wait_policy(settings.openmp_wait_policy)  # before torch is imported
    from imgembed import metrics
    from imgembed.celery_app import create_celery_app
    from imgembed.worker.heartbeat import start_heartbeat
    from imgembed.worker.model_errors import ModelLoadError
    from imgembed.worker.tasks import register_worker_tasks, runtime

    database_url = require_database_url(settings)
    app = create_celery_app(settings)
    register_worker_tasks(app)
    registry = metrics.serve(settings, "worker")
    if registry is not None:
        runtime().metrics = metrics.WorkerMetrics(registry)
    if preload:
        # Both towers before the first task (and before the first heartbeat, which is what shows the
        # worker in imgembed.workers): a first text or query image waits on no export or load.
        from imgembed.models.names import parse_model_spec

        towers: tuple[Literal["image", "text"], ...] = (
            ("image", "text") if parse_model_spec(settings.model).embeds_text else ("image",))
        try:
            for tower in towers:
                runtime().batcher(settings.model, tower)
            log.info("worker ready: %s (%s towers loaded)", settings.model, " and ".join(towers))
        except ModelLoadError:
            pass  # said in one line by the runtime; the model's rows wait until it loads
    name = f"imgembed-{os.getpid()}@{socket.gethostname()}"
    stop_beating = start_heartbeat(runtime(), name, database_url)
    try:
        run_celery_worker(app, [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_threads}",
            f"--queues={settings.queue}",
            f"--loglevel={settings.log_level}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
            *(["--task-events"] if settings.celery_events else []),
        ])
    finally:
        stop_beating.set()


def run_celery_worker(app: object, argv: list[str], backoff_seconds: float = 2.0) -> None:
    """Run Celery's worker until a signal asks it to stop. Celery can stop on its own after broker
    trouble (an 'Unrecoverable error' inside kombu while Redis restarts): then it starts again in
    this process, with the models still loaded. Jobs of the lost messages come back by lease."""
    from celery import signals
    from celery.worker import state

    asked_to_stop = threading.Event()
    signals.worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)
    while True:
        try:
            app.worker_main(argv)  # type: ignore[attr-defined]
        except SystemExit:
            pass
        if asked_to_stop.is_set():
            return
        log.error("the Celery worker stopped without being asked to (broker trouble?); starting it again in %.0fs",
                  backoff_seconds)
        state.should_stop = state.should_terminate = None
        time.sleep(backoff_seconds)
