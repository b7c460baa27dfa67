"""Model lifecycle with real workers: backfill beside the current model while inserts continue,
switch under concurrent queries, drop, and two dimensions side by side."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from imgembed.db import connect
from imgembed.models.registry import register_model
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, Services, wait_for

SECOND_MODEL = "imgembed-micro"  # 32 dimensions beside the test model's 64


def storage(db: psycopg.Connection, model: str) -> str:
    return db.execute("SELECT imgembed.storage_table('gallery', %s)", (model,)).fetchone()[0]


def settled(db: psycopg.Connection, model: str, rows: int) -> bool:
    row = db.execute("SELECT embedded, pending + in_flight FROM imgembed.status "
                     "WHERE table_name = 'public.gallery' AND model = %s", (model,)).fetchone()
    return row is not None and row[0] == rows and row[1] == 0


def test_backfill_switch_and_drop(db: psycopg.Connection, services: Services, database_url: str) -> None:
    images = [shape.png_bytes() for shape in random_shapes(160, seed=4)]
    db.execute("CREATE TABLE gallery (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('gallery', 'image')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO gallery VALUES (%s, %s)", [(i, images[i]) for i in range(80)])
    services.start("dispatch")
    worker = services.start("worker")
    wait_for(lambda: settled(db, "imgembed-tiny", 80), 180, "first model embedded")
    services.stop(worker)  # the second model's backfill waits for a worker: held while it is checked

    # A second model of another dimension backfills while inserts continue.
    register_model(db, SECOND_MODEL)
    db.execute("SELECT imgembed.add_model('gallery', %s)", (SECOND_MODEL,))

    def writer() -> None:
        with connect(database_url) as connection:
            for start in range(80, 160, 10):
                with connection.cursor() as cursor:
                    cursor.executemany("INSERT INTO gallery VALUES (%s, %s)",
                                       [(i, images[i]) for i in range(start, start + 10)])

    inserts = threading.Thread(target=writer)
    inserts.start()
    # While it backfills, queries keep using the current default, and switching is refused.
    assert len(db.execute("SELECT * FROM imgembed.similar('gallery', 1::bigint, 5)").fetchall()) == 5
    inserts.join()
    assert not settled(db, SECOND_MODEL, 160)
    with pytest.raises(psycopg.Error, match="still backfilling"):
        db.execute("SELECT imgembed.use_model('gallery', %s)", (SECOND_MODEL,))
    services.start("worker")
    wait_for(lambda: settled(db, SECOND_MODEL, 160) and settled(db, "imgembed-tiny", 160), 180, "both models complete")
    for model, dim in (("imgembed-tiny", 64), (SECOND_MODEL, 32)):
        count, distinct, dims = db.execute(
            f"SELECT count(*), count(DISTINCT id), min(vector_dims(embedding)) FROM {storage(db, model)}"
        ).fetchone()
        assert (count, distinct, dims) == (160, 160, dim), model

    # Switch under concurrent queries: none fails, none comes back empty.
    errors: list[BaseException] = []
    empty = 0
    stop = threading.Event()

    def searcher() -> None:
        nonlocal empty
        with connect(database_url) as connection:
            while not stop.is_set():
                try:
                    rows = connection.execute("SELECT * FROM imgembed.similar('gallery', 3::bigint, 5)").fetchall()
                    empty += len(rows) == 0
                except BaseException as error:  # noqa: BLE001 - recorded and asserted below
                    errors.append(error)

    readers = [threading.Thread(target=searcher) for _ in range(3)]
    for reader in readers:
        reader.start()
    for _ in range(5):
        db.execute("SELECT imgembed.use_model('gallery', %s)", (SECOND_MODEL,))
        db.execute("SELECT imgembed.use_model('gallery', 'imgembed-tiny')")
    db.execute("SELECT imgembed.use_model('gallery', %s)", (SECOND_MODEL,))
    stop.set()
    for reader in readers:
        reader.join()
    assert errors == [] and empty == 0
    assert db.execute("SELECT vector_dims(imgembed.vector_of('gallery', 3::bigint))").fetchone()[0] == 32

    # Drop the old model: its vectors, index and jobs go; the new default answers.
    with pytest.raises(psycopg.Error, match="is the default"):
        db.execute("SELECT imgembed.drop_model('gallery', %s)", (SECOND_MODEL,))
    old_storage = storage(db, "imgembed-tiny")
    db.execute("SELECT imgembed.drop_model('gallery', 'imgembed-tiny')")
    assert db.execute("SELECT to_regclass(%s)", (f"{old_storage}",)).fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM imgembed.job j JOIN imgembed.model m ON m.id = j.model_id "
                      "JOIN imgembed.watch w ON w.id = j.watch_id "
                      "WHERE m.name = 'imgembed-tiny' AND w.table_name = 'public.gallery'").fetchone()[0] == 0
    db.execute("INSERT INTO gallery VALUES (500, %s)", (images[0],))
    wait_for(lambda: settled(db, SECOND_MODEL, 161), 120, "a new row embedded by the remaining model only")
    assert db.execute("SELECT count(*) FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
                      "WHERE w.table_name = 'public.gallery'").fetchone()[0] == 1


def test_forced_switch_and_forget(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE gallery (id bigint PRIMARY KEY, image bytea)")
    db.execute("INSERT INTO gallery VALUES (1, 'x')")
    db.execute("SELECT imgembed.watch('gallery', 'image')")
    register_model(db, SECOND_MODEL)
    db.execute("SELECT imgembed.add_model('gallery', %s)", (SECOND_MODEL,))
    with pytest.raises(psycopg.Error, match="still backfilling"):
        db.execute("SELECT imgembed.use_model('gallery', %s)", (SECOND_MODEL,))
    db.execute("SELECT imgembed.use_model('gallery', %s, force => true)", (SECOND_MODEL,))
    with pytest.raises(psycopg.Error, match="still the default"):
        db.execute("SELECT imgembed.forget_model(%s)", (SECOND_MODEL,))
    db.execute("SELECT imgembed.use_model('gallery', 'imgembed-tiny', force => true)")
    db.execute("SELECT imgembed.forget_model(%s)", (SECOND_MODEL,))
    assert db.execute("SELECT count(*) FROM imgembed.model WHERE name = %s", (SECOND_MODEL,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM imgembed.job WHERE model_id NOT IN (SELECT id FROM imgembed.model)").fetchone()[0] == 0


def run_cli(services: Services, *arguments: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "imgembed", *arguments], cwd=REPO, env=services.env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_models_add_wait_list_and_finetune_register(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    shapes = random_shapes(40, seed=8)
    db.execute("CREATE TABLE gallery (id bigint PRIMARY KEY, image bytea, caption text)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO gallery VALUES (%s, %s, %s)", [(i, s.png_bytes(), s.caption) for i, s in enumerate(shapes)])
    db.execute("SELECT imgembed.watch('gallery', 'image')")
    services.start("dispatch")
    services.start("worker")

    added = run_cli(services, "models", "add", SECOND_MODEL, "--table", "public.gallery", "--wait")
    assert "backfilling public.gallery" in added.stdout
    assert settled(db, SECOND_MODEL, 40)
    listing = run_cli(services, "models", "list").stdout
    assert SECOND_MODEL in listing and "public.gallery (40/40)" in listing
    run_cli(services, "models", "use", "public.gallery", SECOND_MODEL)
    run_cli(services, "models", "drop", "imgembed-tiny", "--table", "public.gallery")
    assert db.execute("SELECT count(*) FROM imgembed.status WHERE table_name = 'public.gallery'").fetchone()[0] == 1

    db.execute("INSERT INTO gallery VALUES (1000, 'these bytes are no image', 'a row that cannot train')")
    checkpoint = tmp_path / "gallery.pt"
    tuned = run_cli(services, "finetune", "--table", "gallery", "--image-column", "image", "--text-column", "caption",
                    "--model", "imgembed-tiny", "--from-scratch", "--epochs", "2", "--batch-size", "8",
                    "--lr", "1e-3", "--out", str(checkpoint), "--register")
    assert "recall@1" in tuned.stdout and checkpoint.exists()
    assert "skipped 1 pairs whose image could not be read (1 not an image)" in tuned.stdout
    name, sha256 = db.execute("SELECT name, sha256 FROM imgembed.model WHERE pretrained = %s", (str(checkpoint),)).fetchone()
    assert name == f"imgembed-tiny:{checkpoint}" and len(sha256) == 64


def test_a_checkpoint_changed_since_registration_fails_its_jobs_with_the_reason(
    db: psycopg.Connection, services: Services, tmp_path: Path
) -> None:
    """Vectors of two sets of weights must never share a model name: a worker refuses a checkpoint
    file that is not the one registered, and the jobs say why (they wait for the file to come back)."""
    import torch

    from imgembed.models.names import parse_model_spec
    from imgembed.worker.pytorch.embedding import load_model

    state = load_model(parse_model_spec("imgembed-tiny"), "cpu").model.state_dict()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(state, checkpoint)
    name = f"imgembed-tiny:{checkpoint}"
    register_model(db, name)
    retrained = tmp_path / "retrained.pt"
    torch.save({key: value + 0.01 if value.is_floating_point() else value for key, value in state.items()}, retrained)
    retrained.replace(checkpoint)

    db.execute("CREATE TABLE shots (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('shots', 'image', model => %s)", (name,))
    db.execute("INSERT INTO shots VALUES (1, %s)", (random_shapes(1, seed=3)[0].png_bytes(),))
    services.start("dispatch")
    services.start("worker")
    error = wait_for(lambda: db.execute("SELECT last_error FROM imgembed.job WHERE last_error IS NOT NULL").fetchone(),
                     60, "the job's error")
    assert "is not the file it was registered with" in error[0] and str(checkpoint) in error[0]  # type: ignore[index]
    assert db.execute("SELECT embedded FROM imgembed.status WHERE model = %s", (name,)).fetchone()[0] == 0


def test_dropping_a_model_everywhere_while_its_jobs_are_in_flight(db: psycopg.Connection, services: Services) -> None:
    """`imgembed models drop NAME` (no --table) while a claim of its jobs is in flight: the model, its
    vectors and jobs go; the claim's late finish writes nothing and fails nothing; the table goes on
    with its other model."""
    shapes = random_shapes(12, seed=4)
    db.execute("CREATE TABLE gallery (id bigint PRIMARY KEY, image bytea)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO gallery VALUES (%s, %s)", [(i, s.png_bytes()) for i, s in enumerate(shapes)])
    db.execute("SELECT imgembed.watch('gallery', 'image')")
    register_model(db, SECOND_MODEL)
    db.execute("SELECT imgembed.add_model('gallery', %s)", (SECOND_MODEL,))
    db.execute("SELECT imgembed.expand_intake(1000)")
    # A claim of the second model's jobs, as a dispatcher makes one for a worker that is still busy.
    second_id = db.execute("SELECT id FROM imgembed.model WHERE name = %s", (SECOND_MODEL,)).fetchone()[0]
    db.execute("UPDATE imgembed.job SET not_before = now() + interval '1 hour' WHERE model_id <> %s", (second_id,))
    claim_id, model, job_ids = db.execute("SELECT * FROM imgembed.claim_batch(100, 300)").fetchone()
    assert model == SECOND_MODEL and len(job_ids) == 12
    assert db.execute("SELECT imgembed.start_claim(%s, 300)", (claim_id,)).fetchall()

    dropped = run_cli(services, "models", "drop", SECOND_MODEL)
    assert f"dropped {SECOND_MODEL} everywhere" in dropped.stdout
    assert db.execute("SELECT count(*) FROM imgembed.model WHERE name = %s", (SECOND_MODEL,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM imgembed.job WHERE model_id = %s", (second_id,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM imgembed.watch_model WHERE model_id = %s", (second_id,)).fetchone()[0] == 0
    # The worker finishes its claim late: nothing is written, nothing fails, no error.
    written = db.execute("SELECT imgembed.finish_batch(%s, %s, array_fill(NULL::vector, ARRAY[%s]), '{}', '{}', '{}', "
                         "3, 1)", (claim_id, job_ids, len(job_ids))).fetchone()[0]
    assert written == 0 and db.execute("SELECT count(*) FROM imgembed.job WHERE status = 'failed'").fetchone()[0] == 0

    db.execute("UPDATE imgembed.job SET not_before = now()")
    services.start("dispatch")
    services.start("worker")
    assert wait_for(lambda: settled(db, "imgembed-tiny", 12), 180, "the table's own model embeds every row")
    assert [row[0] for row in db.execute("SELECT model FROM imgembed.status WHERE table_name = 'public.gallery'")] == [
        "imgembed-tiny"]
