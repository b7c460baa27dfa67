"""Text search end to end: texts are embedded by the same workers and model as the images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, Services, wait_for


@pytest.fixture
def shapes_table(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("CREATE TABLE shapes (id bigint PRIMARY KEY, image bytea, caption text)")
    db.execute("SELECT imgembed.watch('shapes', 'image')")
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO shapes VALUES (%s, %s, %s)",
            [(i, shape.png_bytes(), shape.caption) for i, shape in enumerate(random_shapes(40, seed=2))],
        )
    return db


def test_search_text_waits_for_the_worker_then_serves_from_the_stored_vector(
    shapes_table: psycopg.Connection, services: Services, tmp_path: Path
) -> None:
    db = shapes_table
    services.start("dispatch")
    worker = services.start("worker")
    wait_for(lambda: db.execute("SELECT pending + in_flight = 0 AND embedded = 40 FROM imgembed.status "
                                "WHERE table_name = 'public.shapes'").fetchone()[0], 180, "shapes embedded")
    # The worker loaded both towers before its first task: a first text waits on no load or export.
    assert "worker ready: imgembed-tiny (image and text towers loaded)" in worker.log_path.read_text()  # type: ignore[attr-defined]

    # Never seen before: enqueued in its own transaction (dblink), embedded, then answered.
    first = db.execute("SELECT id, distance FROM imgembed.search_text('shapes', 'a red circle', 5, timeout_seconds => 60)").fetchall()
    assert len(first) == 5 and all(isinstance(row[0], str) for row in first)
    assert [row[1] for row in first] == sorted(row[1] for row in first)
    typed = db.execute("SELECT s.id, s.caption FROM imgembed.search_text('shapes', NULL::bigint, 'a red circle', 5) r "
                       "JOIN shapes s ON s.id = r.id").fetchall()
    assert [str(row[0]) for row in typed] == [row[0] for row in first]

    # Second call: the stored vector answers; nothing new is queued.
    jobs_before = db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0]
    again = db.execute("SELECT id, distance FROM imgembed.search_text('shapes', 'a red circle', 5, timeout_seconds => 0)").fetchall()
    assert again == first
    assert db.execute("SELECT count(*) FROM imgembed.text_query WHERE query = 'a red circle'").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == jobs_before

    # request_text() first, then search: the same answer path.
    db.execute("SELECT imgembed.request_text('a blue square')")
    assert len(db.execute("SELECT * FROM imgembed.search_text('shapes', 'a blue square', 3, timeout_seconds => 60)").fetchall()) == 3

    # The CLI's search commands.
    env = services.env()
    image_file = tmp_path / "query.png"
    random_shapes(1, seed=99)[0].image.save(image_file)
    expected = {
        "a red circle": db.execute("SELECT id FROM imgembed.search_text('shapes', 'a red circle', 3)").fetchall(),
        "--like": db.execute("SELECT id FROM imgembed.similar('shapes', 3::bigint, 3)").fetchall(),
        "--image": db.execute("SELECT id FROM imgembed.search_image('shapes', %s, 3, timeout_seconds => 120)",
                              (image_file.read_bytes(),)).fetchall(),
    }
    for arguments in (["a red circle"], ["--like", "3"], ["--image", str(image_file)]):
        result = subprocess.run(
            [sys.executable, "-m", "imgembed", "search", "--table", "shapes", "-k", "3", *arguments],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()  # header, rule, then one row per line, its key first
        assert len(lines) == 5 and [line.split()[0] for line in lines[2:]] == [str(row[0]) for row in expected[arguments[0]]], \
            result.stdout


def test_search_text_without_a_worker_fails_clearly(shapes_table: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error, match="no vector for text .* after 1 s") as raised:
        shapes_table.execute("SELECT * FROM imgembed.search_text('shapes', 'a green triangle', timeout_seconds => 1)")
    assert "worker" in (raised.value.diag.message_hint or "")


def test_texts_queued_are_bounded(db: psycopg.Connection) -> None:
    """No one can bury the workers in texts: a text is at most 1,000 characters, and at most 10,000
    texts wait for a worker, every role together (one role: imgembed.query_requests); a text asked
    for before still answers."""
    with pytest.raises(psycopg.Error, match="at most 1,000"):
        db.execute("SELECT imgembed.request_text(%s)", ("x" * 1001,))
    db.execute("SELECT imgembed.request_text('text 5')")
    db.execute("INSERT INTO imgembed.text_query (query) SELECT 'text ' || g FROM generate_series(6, 10004) g")
    with pytest.raises(psycopg.Error, match=r"too many texts wait for a worker \(10000\)"):
        db.execute("SELECT imgembed.request_text('one more')")
    assert db.execute("SELECT imgembed.request_text('text 5')").fetchone()[0] > 0
