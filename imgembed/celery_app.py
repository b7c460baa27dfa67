"""The Celery application: built on demand from settings, never at import time.

Tasks carry job ids and a claim id only; the queue table in PostgreSQL is the source of truth,
so a lost or duplicated Celery message costs time, never an embedding.
"""

from __future__ import annotations

from celery import Celery

from imgembed.settings import Settings, require_redis_url

TASK_EMBED_BATCH = "imgembed.embed_batch"
TASK_CLUSTER = "imgembed.cluster"
TASK_REDUCE = "imgembed.reduce"


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("imgembed", broker=require_redis_url(settings), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.celery_events,  # IMGEMBED_CELERY_EVENTS: Flower sees tasks
        task_send_sent_event=settings.celery_events,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app
