"""Nothing lost under real faults: concurrent writers, workers and dispatchers killed with
SIGKILL, Redis restarted empty, PostgreSQL restarted. Ends with an exact check: every row has
exactly the vector of its current image, deleted rows have none, and no job is left."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from imgembed.db import as_array, connect
from imgembed.images.decode import decode_image
from imgembed.local.postgres import EmbeddedPostgres
from imgembed.local.redis import PrivateRedis
from imgembed.local.service import port_is_open
from imgembed.models.names import parse_model_spec
from imgembed.settings import load_settings
from imgembed.training.synthetic import random_shapes
from imgembed.worker.pytorch.embedding import load_model
from tests.conftest import TEST_MODEL, Services, wait_for

WRITERS = 4
ROWS_PER_WRITER = 1250
BURST = 50


class Writer(threading.Thread):
    """Inserts its rows in bursts, changes some images and deletes some rows; retries a burst
    whose transaction the database restart broke (every statement is safe to run twice)."""

    def __init__(self, number: int, database_url: str, images: list[bytes]) -> None:
        super().__init__(name=f"writer-{number}")
        self.number, self.database_url, self.images = number, database_url, images
        self.error: BaseException | None = None

    def transaction(self, work) -> None:  # type: ignore[no-untyped-def]
        for _ in range(60):
            try:
                with psycopg.connect(self.database_url) as connection, connection.transaction():
                    work(connection)
                return
            except psycopg.OperationalError:
                time.sleep(0.5)
        raise RuntimeError("database unreachable for 30 s")

    def run(self) -> None:
        try:
            rng = random.Random(self.number)
            first = self.number * ROWS_PER_WRITER
            for start in range(first, first + ROWS_PER_WRITER, BURST):
                rows = [(i, self.images[i % len(self.images)]) for i in range(start, start + BURST)]
                # ON CONFLICT: a burst whose commit reply was lost in the restart is retried as a no-op.
                self.transaction(lambda c: c.cursor().executemany(
                    "INSERT INTO stress VALUES (%s, %s) ON CONFLICT (id) DO NOTHING", rows))
                time.sleep(rng.uniform(0, 0.05))
                if start > first:
                    changed = rng.sample(range(first, start), 3)
                    self.transaction(lambda c: c.cursor().executemany(
                        "UPDATE stress SET image = %s WHERE id = %s",
                        [(self.images[rng.randrange(len(self.images))], key) for key in changed]))
                    gone = rng.randrange(first, start)
                    self.transaction(lambda c: c.execute("DELETE FROM stress WHERE id = %s", (gone,)))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


def restart_redis(redis: PrivateRedis) -> None:
    import redis as redis_client

    redis_client.Redis.from_url(redis.url).flushall()  # queued Celery messages are lost
    redis.stop()
    wait_for(lambda: not port_is_open("127.0.0.1", redis.port), 30, "Redis to close its port")
    redis.start()


@pytest.mark.slow
def test_nothing_lost_under_faults(
    db: psycopg.Connection, services: Services, database_url: str, pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    services.redis_url = redis.url
    services.extra_env.update(IMGEMBED_LEASE_SECONDS="4", IMGEMBED_BATCH_SIZE="16", IMGEMBED_MAX_IN_FLIGHT="256")
    db.execute("CREATE TABLE stress (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('stress', 'image')")
    images = [shape.png_bytes() for shape in random_shapes(64, seed=12)]

    processes = {name: services.start(role) for name, role in
                 (("dispatch-a", "dispatch"), ("dispatch-b", "dispatch"), ("worker-a", "worker"), ("worker-b", "worker"))}
    writers = [Writer(n, database_url, images) for n in range(WRITERS)]
    for writer in writers:
        writer.start()

    def embedded() -> int:
        return db.execute("SELECT embedded FROM imgembed.status WHERE table_name = 'public.stress'").fetchone()[0]

    try:
        for step, name in enumerate(("worker-a", "dispatch-a", "worker-b", "worker-a")):
            wait_for(lambda target=(step + 1) * 300: embedded() >= target, 180, f"{(step + 1) * 300} rows embedded")
            services.stop(processes[name], sig=signal.SIGKILL)
            processes[name] = services.start("worker" if name.startswith("worker") else "dispatch")
        restart_redis(redis)
        wait_for(lambda: embedded() >= 1800, 180, "progress after the Redis restart")
        pg_server.restart()
        db.close()
    finally:
        for writer in writers:
            writer.join(300)
    assert all(writer.error is None for writer in writers), [writer.error for writer in writers]

    with connect(database_url) as check:
        def settled() -> bool:
            row = check.execute("SELECT pending + in_flight, failed FROM imgembed.status "
                                "WHERE table_name = 'public.stress'").fetchone()
            return row[0] == 0 and row[1] == 0 and check.execute(
                "SELECT count(*) FROM imgembed.job").fetchone()[0] == 0
        wait_for(settled, 300, "every job done after the faults")

        storage = check.execute("SELECT imgembed.storage_table('stress')").fetchone()[0]
        rows = dict(check.execute("SELECT id, image FROM stress").fetchall())
        vectors = dict(check.execute(f"SELECT id, embedding FROM {storage}").fetchall())
        assert set(vectors) == set(rows), "every row has a vector and no deleted row has one"
        assert check.execute(f"SELECT count(*) = count(DISTINCT id) FROM {storage}").fetchone()[0]

    # Each vector is the embedding of the row's current image, not of an older version.
    model = load_model(parse_model_spec(TEST_MODEL), "cpu")
    settings = load_settings({})
    expected = {}
    for picture in set(rows.values()):
        pixels = model.preprocess(decode_image(picture, settings, model.input_size)).unsqueeze(0)
        expected[picture] = model.embed_pixels(pixels)[0]
    wrong = [key for key, picture in rows.items() if not np.allclose(as_array(vectors[key]), expected[picture], atol=1e-4)]
    assert wrong == []
    for process in processes.values():
        assert process.poll() is None, "workers and dispatchers reconnect by themselves"
    redis.stop()
