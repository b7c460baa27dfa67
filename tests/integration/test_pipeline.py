"""The whole pipeline with real processes: PostgreSQL + pgvector, Redis, `imgembed dispatch` and
a Celery worker (`imgembed worker`) embedding with the bundled tiny OpenCLIP model."""

from __future__ import annotations

import csv
import http.server
import io
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image

from imgembed.db import as_array
from imgembed.images.decode import decode_image
from imgembed.images.image_error import Reason
from imgembed.models.names import parse_model_spec
from imgembed.settings import load_settings
from imgembed.training.synthetic import random_shapes
from imgembed.worker.pytorch.embedding import load_model
from tests.conftest import REPO, TEST_MODEL, TESTDATA, Services, storage_of, wait_for

ODD_IMAGES = TESTDATA / "odd-images"
PHOTOS = TESTDATA / "photos"
TINY_DIM = 64
EMBED_TIMEOUT = 180


def backlog(db: psycopg.Connection, table: str) -> tuple[int, int, int, int]:
    """(embedded, pending, in_flight, failed) of a table's default model."""
    row = db.execute(
        "SELECT embedded, pending, in_flight, failed FROM imgembed.status WHERE table_name = %s AND is_default",
        (table,),
    ).fetchone()
    return tuple(row)  # type: ignore[return-value]


def wait_until_settled(db: psycopg.Connection, table: str, expected_done: int, timeout: float = EMBED_TIMEOUT) -> None:
    def settled() -> bool:
        embedded, pending, in_flight, failed = backlog(db, table)
        return pending == 0 and in_flight == 0 and embedded + failed >= expected_done

    wait_for(settled, timeout, f"{expected_done} rows of {table} embedded or failed (now {backlog(db, table)})")


def shape_files(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shape in enumerate(random_shapes(count, seed=3)):
        path = directory / f"shape {index}.png"  # a space, to exercise file:// quoting
        shape.image.save(path)
        paths.append(path)
    return paths


def start_pipeline(services: Services) -> tuple[object, object]:
    return services.start("dispatch"), services.start("worker")


def test_bytea_paths_and_file_uris_all_get_unit_vectors(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), image bytea)")
    db.execute("CREATE TABLE located (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), location text)")
    db.execute("SELECT imgembed.watch('items', 'image')")
    db.execute("SELECT imgembed.watch('located', 'location')")
    start_pipeline(services)

    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO items (image) VALUES (%s)", [(s.png_bytes(),) for s in random_shapes(50, seed=1)])
        files = shape_files(tmp_path / "images", 100)
        cursor.executemany("INSERT INTO located (location) VALUES (%s)", [(str(p),) for p in files[:50]])
        cursor.executemany("INSERT INTO located (location) VALUES (%s)", [(p.as_uri(),) for p in files[50:]])

    wait_until_settled(db, "public.items", 50)
    wait_until_settled(db, "public.located", 100)
    for table in ("public.items", "public.located"):
        assert backlog(db, table) == (50 if table == "public.items" else 100, 0, 0, 0)
        dims, low, high = db.execute(
            f"SELECT min(vector_dims(embedding)), min(vector_norm(embedding)), max(vector_norm(embedding)) "
            f"FROM {storage_of(db, table)}"
        ).fetchone()
        assert dims == TINY_DIM
        assert low == pytest.approx(1.0, abs=1e-4) and high == pytest.approx(1.0, abs=1e-4)
    # Results join back to the user's own rows and key type.
    joined = db.execute(
        f"SELECT count(*) FROM items i JOIN {storage_of(db, 'public.items')} e ON e.id = i.id"
    ).fetchone()[0]
    assert joined == 50
    some_key, image = db.execute("SELECT id, image FROM items LIMIT 1").fetchone()
    assert isinstance(some_key, uuid.UUID)
    # The row's vector is the model's own embedding of its image (PyTorch, here in the test).
    stored = as_array(db.execute("SELECT imgembed.vector_of('items', %s::uuid)", (some_key,)).fetchone()[0])
    reference = load_model(parse_model_spec(TEST_MODEL), "cpu")
    (expected,) = reference.embed_images([reference.prepare(decode_image(bytes(image), load_settings({}),
                                                                         target_size=reference.input_size))])
    assert float(np.dot(stored, expected) / np.linalg.norm(stored) / np.linalg.norm(expected)) >= 0.9999


@pytest.mark.parametrize("jpeg_decode", ["pillow", "device"])
def test_odd_images_embed_or_fail_alone(db: psycopg.Connection, services: Services, jpeg_decode: str) -> None:
    """Also with JPEGs decoded by torchvision on the model's device (here the CPU): the same
    images embed, the same fail, with Pillow's reasons."""
    services.extra_env["IMGEMBED_JPEG_DECODE"] = jpeg_decode
    with (ODD_IMAGES / "MANIFEST.csv").open(newline="") as handle:
        manifest = {row["file"]: row for row in csv.DictReader(handle)}
    db.execute("CREATE TABLE odd (name text PRIMARY KEY, data bytea)")
    db.execute("SELECT imgembed.watch('odd', 'data')")
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO odd VALUES (%s, %s)", [(name, (ODD_IMAGES / name).read_bytes()) for name in manifest]
        )
    _, worker = start_pipeline(services)
    wait_until_settled(db, "public.odd", len(manifest))

    embedded = {row[0] for row in db.execute(f"SELECT id FROM {storage_of(db, 'public.odd')}")}
    failures = dict(db.execute("SELECT key, last_error FROM imgembed.failures WHERE table_name = 'public.odd'").fetchall())
    for name, row in manifest.items():
        if row["pillow_result"] == "ok":
            assert name in embedded, f"{name} should embed; failed with {failures.get(name)}"
        else:
            assert name not in embedded
            assert name in failures, f"{name} should be recorded as failed"
            assert failures[name] and "unexpected" not in failures[name], failures[name]
            # It never quotes the file: no run of 6 printable bytes of it is in the error.
            runs = {run.decode() for run in re.findall(rb"[\x21-\x7e]{6,}", (ODD_IMAGES / name).read_bytes())}
            assert not [run for run in runs if run in failures[name]], (name, failures[name])
    assert failures["decompression_bomb.gif"].startswith("decompression bomb: ")
    assert failures["truncated_jpeg.jpg"].startswith("corrupt image: ") and "truncated" in failures["truncated_jpeg.jpg"]
    assert failures["empty.jpg"].startswith("not an image: ") and "empty" in failures["empty.jpg"]
    assert failures["html_named.jpg"].startswith("not an image: ") and "HTML" in failures["html_named.jpg"]
    # Failures group by a few stable reasons, each row keeping its full message.
    reasons = dict(db.execute("SELECT reason, failures FROM imgembed.failure_reasons WHERE table_name = 'public.odd'"
                              ).fetchall())
    known = {value for name, value in vars(Reason).items() if name.isupper()}
    assert set(reasons) <= known and sum(reasons.values()) == len(failures)
    assert reasons == {reason: sum(error.startswith(f"{reason}: ") for error in failures.values()) for reason in reasons}

    # The worker survived all of that and still embeds.
    assert worker.poll() is None
    db.execute("INSERT INTO odd VALUES ('after.jpg', %s)", ((ODD_IMAGES / "hopper.jpg").read_bytes(),))
    wait_for(lambda: db.execute(f"SELECT count(*) FROM {storage_of(db, 'public.odd')} WHERE id = 'after.jpg'")
             .fetchone()[0] == 1, EMBED_TIMEOUT, "a new image embedded after the odd ones")


def test_update_delete_truncate(db: psycopg.Connection, services: Services) -> None:
    db.execute("CREATE TABLE pics (id bigint PRIMARY KEY, image bytea, caption text)")
    db.execute("SELECT imgembed.watch('pics', 'image')")
    shapes = random_shapes(6, seed=11)
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO pics VALUES (%s, %s, 'c')", [(i, s.png_bytes()) for i, s in enumerate(shapes[:5])])
    start_pipeline(services)
    wait_until_settled(db, "public.pics", 5)
    storage = storage_of(db, "public.pics")

    def vector_text(key: int) -> str | None:
        row = db.execute(f"SELECT embedding::text, job_id FROM {storage} WHERE id = %s", (key,)).fetchone()
        return row[0] if row else None

    before = vector_text(0)
    db.execute("UPDATE pics SET caption = 'other column'")
    assert db.execute("SELECT (SELECT count(*) FROM imgembed.job) + (SELECT count(*) FROM imgembed.intake)"
                      ).fetchone()[0] == 0  # nothing re-enqueued

    db.execute("UPDATE pics SET image = %s WHERE id = 0", (shapes[5].png_bytes(),))
    wait_for(lambda: vector_text(0) not in (None, before), EMBED_TIMEOUT, "row 0 re-embedded after its image changed")

    db.execute("DELETE FROM pics WHERE id = 1")
    assert vector_text(1) is None
    db.execute("TRUNCATE pics")
    assert db.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 0


def test_rows_inserted_while_dispatcher_is_down_are_embedded(db: psycopg.Connection, services: Services) -> None:
    db.execute("CREATE TABLE later (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('later', 'image')")
    dispatcher, _ = start_pipeline(services)
    services.stop(dispatcher)
    with db.cursor() as cursor:  # their NOTIFYs reach nobody
        cursor.executemany("INSERT INTO later VALUES (%s, %s)", [(i, s.png_bytes()) for i, s in enumerate(random_shapes(100, seed=5))])
    assert backlog(db, "public.later") == (0, 100, 0, 0)
    services.start("dispatch")
    services.start("dispatch")  # two dispatchers share the queue without double work
    wait_until_settled(db, "public.later", 100)
    assert backlog(db, "public.later") == (100, 0, 0, 0)


@pytest.mark.slow
def test_worker_killed_mid_batch_loses_nothing(db: psycopg.Connection, services: Services) -> None:
    photos = sorted(PHOTOS.glob("*.JPEG"))
    assert photos, f"no photos in {PHOTOS}"
    total = 360
    services.extra_env.update(IMGEMBED_LEASE_SECONDS="3", IMGEMBED_BATCH_SIZE="8", IMGEMBED_DECODE_THREADS="1")
    db.execute("CREATE TABLE photos (id bigint PRIMARY KEY, path text)")
    db.execute("SELECT imgembed.watch('photos', 'path')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO photos VALUES (%s, %s)", [(i, str(photos[i % len(photos)])) for i in range(total)])
    dispatcher, worker = start_pipeline(services)

    # Once it has written something, the worker is frozen where it stands, then killed there.
    wait_for(lambda: backlog(db, "public.photos")[0] > 0, EMBED_TIMEOUT, "the worker's first vectors", interval=0.02)
    worker.send_signal(signal.SIGSTOP)
    embedded, _, in_flight, _ = backlog(db, "public.photos")
    assert embedded < total and in_flight > 0  # jobs in flight when it dies
    services.stop(worker, sig=signal.SIGKILL)
    services.start("worker")
    wait_until_settled(db, "public.photos", total)

    storage = storage_of(db, "public.photos")
    assert db.execute(f"SELECT count(*), count(DISTINCT id) FROM {storage}").fetchone() == (total, total)
    assert db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 0
    assert dispatcher.poll() is None


def test_transparent_and_rotated_images_are_normalised(tmp_path: Path) -> None:
    """Decoder contract the pipeline relies on (no services): any mode in, RGB out."""
    from imgembed.images.decode import decode_image
    from imgembed.settings import load_settings

    buffer = io.BytesIO()
    Image.new("RGBA", (10, 20), (0, 0, 0, 0)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), load_settings({}))
    assert image.mode == "RGB" and image.size == (10, 20)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency becomes white, not black


class ImageServer(http.server.ThreadingHTTPServer):
    """A local HTTP server: /ok.png is an image; /busy.png answers 503 until ``healthy`` is set,
    then the image; /gone.png always answers 404. ``requests`` counts the requests per path."""

    body = random_shapes(1, seed=9)[0].png_bytes()

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ImageRequestHandler)
        self.healthy = threading.Event()
        self.requests: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ImageRequestHandler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests[self.path] = self.server.requests.get(self.path, 0) + 1
        if self.path == "/ok.png" or (self.path == "/busy.png" and self.server.healthy.is_set()):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.server.body)))
            self.end_headers()
            self.wfile.write(self.server.body)
        elif self.path == "/busy.png":
            self.send_error(503, "busy")
        else:
            self.send_error(404, "gone")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_transient_errors_retry_with_backoff_then_fail(db: psycopg.Connection, services: Services,
                                                       image_server: ImageServer) -> None:
    services.extra_env.update(
        IMGEMBED_ALLOW_HTTP="1", IMGEMBED_HTTP_ALLOW_PRIVATE="1", IMGEMBED_MAX_ATTEMPTS="3",
        IMGEMBED_RETRY_BACKOFF_SECONDS="0.2",
    )
    db.execute("CREATE TABLE remote (id text PRIMARY KEY, url text)")
    db.execute("SELECT imgembed.watch('remote', 'url')")
    db.execute("INSERT INTO remote VALUES ('ok', %s), ('busy', %s), ('gone', %s)",
               tuple(f"{image_server.url}/{name}.png" for name in ("ok", "busy", "gone")))
    start_pipeline(services)
    wait_until_settled(db, "public.remote", 3)
    assert backlog(db, "public.remote") == (1, 0, 0, 2)
    failures = {key: (attempts, error) for key, attempts, error in
                db.execute("SELECT key, attempts, last_error FROM imgembed.failures").fetchall()}
    assert failures["busy"][0] == 3 and "HTTP 503" in failures["busy"][1]  # retried with backoff, then failed
    assert failures["gone"][0] == 1 and "HTTP 404" in failures["gone"][1]  # not worth retrying
    assert image_server.requests["/busy.png"] == 3

    # Once the cause is fixed, `imgembed retry` queues the failures of that reason again, and only those.
    image_server.healthy.set()
    retried = subprocess.run([sys.executable, "-m", "imgembed", "retry", "--table", "public.remote",
                              "--reason", "HTTP 503"], cwd=REPO, env=services.env(), capture_output=True, text=True,
                             timeout=120)
    assert retried.returncode == 0 and "1 failed jobs queued again" in retried.stdout, retried.stderr
    wait_for(lambda: backlog(db, "public.remote") == (2, 0, 0, 1), EMBED_TIMEOUT, "the retried row embedded")
    assert db.execute("SELECT key FROM imgembed.failures").fetchall() == [("gone",)]

    # retry_failed(table, reason) from SQL does the same: the 404 is tried once more, and fails again.
    assert db.execute("SELECT imgembed.retry_failed('remote', 'HTTP 404')").fetchone()[0] == 1
    wait_for(lambda: image_server.requests["/gone.png"] == 2 and backlog(db, "public.remote") == (2, 0, 0, 1),
             EMBED_TIMEOUT, "the 404 tried again")
    assert db.execute("SELECT imgembed.retry_failed('remote', 'no such reason')").fetchone()[0] == 0


def test_unwatch_while_jobs_are_in_flight(db: psycopg.Connection, services: Services) -> None:
    """Claims sent to the broker, and a worker in the middle of its claims, when the table stops
    being watched: nothing more is written for it, nothing is left behind, and no process errs."""
    photos = sorted(PHOTOS.glob("*.JPEG"))
    assert photos, f"no photos in {PHOTOS}"
    services.extra_env.update(IMGEMBED_BATCH_SIZE="8", IMGEMBED_DECODE_THREADS="1")
    for table in ("waiting", "working"):
        db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, path text)")
        db.execute(f"SELECT imgembed.watch('{table}', 'path')")
    storages = {table: storage_of(db, f"public.{table}") for table in ("waiting", "working")}
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO waiting VALUES (%s, %s)", [(i, str(photos[i % len(photos)])) for i in range(40)])
    dispatcher = services.start("dispatch")
    wait_for(lambda: backlog(db, "public.waiting")[2] == 40, EMBED_TIMEOUT, "every job of `waiting` claimed")
    db.execute("SELECT imgembed.unwatch('waiting')")  # its claims wait in the broker for a worker

    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO working VALUES (%s, %s)", [(i, str(photos[i % len(photos)])) for i in range(400)])
    worker = services.start("worker")
    wait_for(lambda: backlog(db, "public.working")[0] > 0, EMBED_TIMEOUT, "the worker's first vectors", interval=0.02)
    assert backlog(db, "public.working")[2] > 0
    db.execute("SELECT imgembed.unwatch('working')")  # while the worker is at it

    # The worker goes through every claim it was sent (5 of `waiting` among them), writing nothing
    # for either table.
    def worker_log() -> str:
        return worker.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    wait_for(lambda: worker_log().count("nothing owned any more") >= 5, 60, "the claims of `waiting` skipped")
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 0, 60, "no job left")
    for storage in storages.values():
        assert db.execute("SELECT to_regclass(%s)", (f"{storage}",)).fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM imgembed.watch WHERE table_name IN ('public.waiting', 'public.working')"
                      ).fetchone()[0] == 0
    assert worker.poll() is None and dispatcher.poll() is None
    for log in (worker_log(), dispatcher.log_path.read_text(errors="replace")):  # type: ignore[attr-defined]
        assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
