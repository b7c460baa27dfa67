"""A worker's heartbeat: every few seconds it upserts its row in imgembed.worker_heartbeat, so
`imgembed status` and the imgembed.workers view show which workers are alive."""

from __future__ import annotations

import logging
import os
import threading

import psycopg
from psycopg.types.json import Jsonb

from imgembed.db import connect
from imgembed.worker.process_state import WorkerState

log = logging.getLogger(__name__)

BEAT_SECONDS = 5.0


def start_heartbeat(runtime: WorkerState, worker_name: str, database_url: str) -> threading.Event:
    """Beat from a daemon thread (own connection) until the returned event is set."""
    stop = threading.Event()

    def beat_forever() -> None:
        connection: psycopg.Connection | None = None
        while not stop.is_set():
            try:
                if connection is None or connection.closed or connection.broken:
                    connection = connect(database_url, application_name="imgembed-heartbeat")
                loaded = list(runtime.models.values())
                device = str(loaded[0].device) if loaded else runtime.settings.device
                connection.execute(
                    "SELECT imgembed.worker_beat(%s, %s, %s, %s, %s, %s)",
                    (worker_name, os.getpid(), device, sorted({name for name, _ in list(runtime.models)}), runtime.batches,
                     Jsonb(runtime.outage_report())),
                )
            except (psycopg.Error, RuntimeError) as error:  # RuntimeError: models changed while read
                log.warning("heartbeat failed (%s); retrying", str(error).strip())
                connection = None
            stop.wait(BEAT_SECONDS)

    threading.Thread(target=beat_forever, name="imgembed-heartbeat", daemon=True).start()
    return stop
