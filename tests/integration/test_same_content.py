"""Identical image bytes are embedded once: within a claim, and across rows and tables (the vector
the model already made from the same bytes is written again), with every row still getting its own
vector, and a changed copy re-embedded alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import psycopg

from imgembed.training.synthetic import random_shapes
from tests.conftest import Services, wait_for


def _embedded_images(services: Services) -> tuple[int, int]:
    """(distinct images through the forward pass, jobs given a known vector) over the workers' logs."""
    batches = [match.groups() for process in services.processes
               for match in re.finditer(r"reused=(\d+) images=(\d+)", process.log_path.read_text(errors="replace"))]  # type: ignore[attr-defined]
    return sum(int(images) for _, images in batches), sum(int(reused) for reused, _ in batches)


def _vectors(db: psycopg.Connection, table: str) -> dict[int, np.ndarray]:
    storage = db.execute("SELECT imgembed.storage_table(%s)", (table,)).fetchone()[0]
    return {row[0]: row[1].to_numpy()
            for row in db.execute(f"SELECT id::bigint, embedding FROM {storage}")}  # noqa: S608


def _settled(db: psycopg.Connection, table: str, rows: int) -> bool:
    return bool(db.execute("SELECT pending + in_flight = 0 AND embedded = %s FROM imgembed.status WHERE table_name = %s",
                           (rows, table)).fetchone()[0])


def test_identical_images_are_embedded_once(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    shapes = [shape.png_bytes() for shape in random_shapes(5, seed=31)]
    services.extra_env["IMGEMBED_WORKER_THREADS"] = "1"  # one claim at a time: the counts below are exact
    services.start("dispatch")
    services.start("worker")

    # 12 rows repeating 3 images, in one statement (one claim): 3 images through the model.
    db.execute("CREATE TABLE catalogue (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('catalogue', 'image')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO catalogue VALUES (%s, %s)", [(i, shapes[i % 3]) for i in range(12)])
    wait_for(lambda: _settled(db, "public.catalogue", 12), 180, "catalogue embedded")
    assert _embedded_images(services) == (3, 0)
    catalogue = _vectors(db, "catalogue")
    for i in range(12):
        np.testing.assert_array_equal(catalogue[i], catalogue[i % 3])
    assert len({catalogue[i].tobytes() for i in range(3)}) == 3

    # Another table, by file path: three copies of a catalogue image and one new image. The copies
    # get the catalogue's vector without a forward pass; only the new image is embedded.
    files = []
    for number, data in enumerate([shapes[0], shapes[1], shapes[1], shapes[3]]):
        path = tmp_path / f"upload-{number}.png"
        path.write_bytes(data)
        files.append(str(path))
    db.execute("CREATE TABLE uploads (id integer PRIMARY KEY, location text)")
    db.execute("SELECT imgembed.watch('uploads', 'location')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO uploads VALUES (%s, %s)", list(enumerate(files)))
    wait_for(lambda: _settled(db, "public.uploads", 4), 180, "uploads embedded")
    assert _embedded_images(services) == (4, 3)
    uploads = _vectors(db, "uploads")
    np.testing.assert_array_equal(uploads[0], catalogue[0])
    np.testing.assert_array_equal(uploads[1], catalogue[1])
    np.testing.assert_array_equal(uploads[2], catalogue[1])
    assert not any(np.array_equal(uploads[3], vector) for vector in catalogue.values())

    # A new image for one copy: that row alone is embedded again; its twins keep their vectors.
    embedded_at = dict(db.execute("SELECT id, embedded_at FROM " +
                                  db.execute("SELECT imgembed.storage_table('catalogue')").fetchone()[0]).fetchall())
    db.execute("UPDATE catalogue SET image = %s WHERE id = 4", (shapes[4],))
    wait_for(lambda: _settled(db, "public.catalogue", 12) and not np.array_equal(_vectors(db, "catalogue")[4],
                                                                                 catalogue[4]), 120, "row 4 embedded again")
    after = _vectors(db, "catalogue")
    changed_at = dict(db.execute("SELECT id, embedded_at FROM " +
                                 db.execute("SELECT imgembed.storage_table('catalogue')").fetchone()[0]).fetchall())
    assert [key for key in embedded_at if changed_at[key] != embedded_at[key]] == [4]
    for i in (1, 7, 10):  # the other rows that held the same image as row 4
        np.testing.assert_array_equal(after[i], catalogue[1])
    assert _embedded_images(services) == (5, 3)
    assert db.execute("SELECT count(*) FROM imgembed.failures").fetchone()[0] == 0
