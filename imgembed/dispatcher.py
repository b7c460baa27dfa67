"""The dispatcher: wakes on NOTIFY (or every sweep interval), expands the triggers' intake into
jobs, recovers expired leases, claims pending jobs in batches and sends one Celery task per batch
(and one per clustering run or reduced model's fit). Several may run at once: claims use
``FOR UPDATE SKIP LOCKED``. It never imports torch."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from celery import Celery

from imgembed import db, queue
from imgembed.celery_app import TASK_CLUSTER, TASK_EMBED_BATCH, TASK_REDUCE
from imgembed.metrics import DispatcherMetrics
from imgembed.settings import Settings, require_database_url

log = logging.getLogger(__name__)

MAX_RECONNECT_BACKOFF_SECONDS = 30.0


BACKLOG_EVERY_SECONDS = 1.0  # how often the backlog metrics are read again, at most
EXPIRE_QUERIES_EVERY_SECONDS = 300.0  # how often texts and query images nobody asks for any more go


class Dispatcher:
    def __init__(self, settings: Settings, celery_app: Celery, metrics: DispatcherMetrics | None = None) -> None:
        self.settings = settings
        self.celery_app = celery_app
        self.metrics = metrics
        self.stop_event = threading.Event()
        self._backlog_read = 0.0
        self._queries_expired = 0.0

    def _measure_backlog(self, connection: psycopg.Connection) -> None:
        if self.metrics is None or time.monotonic() - self._backlog_read < BACKLOG_EVERY_SECONDS:
            return
        self.metrics.backlog_rows(queue.backlog(connection))
        self._backlog_read = time.monotonic()

    def _expire_queries(self, connection: psycopg.Connection) -> None:
        """Every few minutes: requests for texts and query images that were not made again within
        their window expire (imgembed.expire_queries)."""
        if time.monotonic() - self._queries_expired < EXPIRE_QUERIES_EVERY_SECONDS:
            return
        self._queries_expired = time.monotonic()
        expired = queue.expire_queries(connection)
        if expired:
            log.info("%d texts and query images nobody asked for within their window went", expired)

    def dispatch_once(self, connection: psycopg.Connection) -> int:
        """Expand the intake into jobs, recover expired leases, then send tasks while jobs are
        ready. Returns tasks sent."""
        while queue.expand_intake(connection) and not self.stop_event.is_set():
            pass
        recovered = queue.recover_expired(connection, self.settings.max_attempts)
        if recovered:
            log.warning("recovered %d jobs whose lease expired", recovered)
            if self.metrics is not None:
                self.metrics.recovered.inc(recovered)
        self._measure_backlog(connection)
        self._expire_queries(connection)
        sent = self._dispatch_analysis(connection, "claim_cluster_run", TASK_CLUSTER, "cluster run")
        sent += self._dispatch_analysis(connection, "claim_reduction", TASK_REDUCE, "fit of reduced model")
        while not self.stop_event.is_set():
            if queue.in_flight_count(connection) >= self.settings.max_in_flight:
                break
            claim = queue.claim_batch(connection, self.settings.batch_size, self.settings.lease_seconds)
            if claim is None:
                break
            try:
                self.celery_app.send_task(
                    TASK_EMBED_BATCH,
                    args=[str(claim.claim_id), claim.model_name, claim.job_ids],
                    queue=self.settings.queue,
                )
            except Exception:
                queue.release_claim(connection, claim.claim_id)
                raise
            sent += 1
            if self.metrics is not None:
                self.metrics.claims.labels(claim.model_name).inc()
            log.info("dispatched claim=%s model=%s jobs=%d", claim.claim_id, claim.model_name, len(claim.job_ids))
        return sent

    def _dispatch_analysis(self, connection: psycopg.Connection, claim_function: str, task: str, what: str) -> int:
        """Send one task per clustering run or fit that ``imgembed.<claim_function>`` hands out."""
        sent = 0
        while not self.stop_event.is_set():
            (claimed,) = connection.execute(
                f"SELECT imgembed.{claim_function}(%s, %s)", (self.settings.lease_seconds, self.settings.max_attempts)
            ).fetchone()  # type: ignore[misc]
            if claimed is None:
                return sent
            self.celery_app.send_task(task, args=[claimed], queue=self.settings.queue)
            log.info("dispatched %s %s", what, claimed)
            sent += 1
        return sent

    def _wait_for_notify(self, connection: psycopg.Connection) -> None:
        for _ in connection.notifies(timeout=self.settings.sweep_seconds, stop_after=1):
            pass

    def run(self) -> None:
        """Run until ``stop_event`` is set, reconnecting with backoff when the database goes away."""
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                with db.connect(require_database_url(self.settings), application_name="imgembed-dispatcher") as connection:
                    connection.execute(f"LISTEN {db.NOTIFY_CHANNEL}")
                    log.info("dispatcher listening on %s (queue %s)", db.NOTIFY_CHANNEL, self.settings.queue)
                    backoff = 0.5
                    while not self.stop_event.is_set():
                        self.dispatch_once(connection)
                        self._wait_for_notify(connection)
            except psycopg.OperationalError as error:
                log.warning("database unavailable (%s); reconnecting in %.1fs", str(error).strip(), backoff)
            except Exception as error:  # noqa: BLE001 - e.g. Redis down: keep the dispatcher alive
                log.warning("dispatch failed (%s: %s); retrying in %.1fs", type(error).__name__, error, backoff)
            self.stop_event.wait(backoff)
            backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF_SECONDS)
        log.info("dispatcher stopped")
