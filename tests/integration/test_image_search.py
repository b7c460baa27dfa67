"""Searching with an image that is in no table (reverse image search): the workers embed it like a
text query, it is kept by its content hash, and the filters, paging and keys of similar() apply."""

from __future__ import annotations

import io
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from tests.conftest import TESTDATA, Services, wait_for

PHOTOS = sorted((TESTDATA / "photos").glob("*.JPEG"))[:24]


def _reencoded(path: Path, scale: float = 0.7, quality: int = 70) -> bytes:
    """The photo as a customer's copy of it: resized and saved again as a lower-quality JPEG."""
    with Image.open(path) as image:
        smaller = image.convert("RGB").resize((int(image.width * scale), int(image.height * scale)))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture
def photos(db: psycopg.Connection, services: Services, tmp_path: Path) -> psycopg.Connection:
    services.extra_env["IMGEMBED_ALLOWED_ROOTS"] = str(tmp_path / "uploads")  # where readers' paths may point
    (tmp_path / "uploads").mkdir()
    db.execute("CREATE TABLE photos (id bigint PRIMARY KEY, image bytea, kind text)")
    db.execute("SELECT imgembed.watch('photos', 'image')")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO photos VALUES (%s, %s, %s)",
                           [(i, path.read_bytes(), "even" if i % 2 == 0 else "odd") for i, path in enumerate(PHOTOS)])
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT pending + in_flight = 0 AND embedded = %s FROM imgembed.status "
                                "WHERE table_name = 'public.photos'", (len(PHOTOS),)).fetchone()[0], 180, "photos embedded")
    return db


def test_a_resized_reencoded_copy_finds_its_row_first(photos: psycopg.Connection, services: Services,
                                                       tmp_path: Path) -> None:
    db = photos
    for number in (0, 5, 11, 17, 23):
        query = _reencoded(PHOTOS[number])
        hits = db.execute("SELECT id, distance FROM imgembed.search_image('photos', %s, 3, timeout_seconds => 60)",
                          (query,)).fetchall()
        assert hits[0][0] == str(number), (number, hits)
        assert [hit[1] for hit in hits] == sorted(hit[1] for hit in hits)

    # Asked again: kept by its content hash, answered without a worker round trip or a new row.
    query = _reencoded(PHOTOS[5])
    queries = db.execute("SELECT count(*) FROM imgembed.image_query").fetchone()[0]
    typed = db.execute("SELECT id, distance FROM imgembed.search_image('photos', NULL::bigint, %s, 3, timeout_seconds => 0)",
                       (query,)).fetchall()
    assert typed[0][0] == 5 and isinstance(typed[0][0], int)
    assert db.execute("SELECT count(*) FROM imgembed.image_query").fetchone()[0] == queries

    # Filters, the cut-off and paging as in similar().
    odd = db.execute("SELECT id FROM imgembed.search_image('photos', %s, 5, filter => '{\"kind\": \"odd\"}')",
                     (query,)).fetchall()
    assert odd[0] == ("5",) and all(int(row[0]) % 2 == 1 for row in odd)
    first, second = db.execute("SELECT id, distance FROM imgembed.search_image('photos', %s, 2)", (query,)).fetchall()
    after = db.execute("SELECT id FROM imgembed.search_image('photos', %s, 1, after_distance => %s, after_id => %s)",
                       (query, second[1], second[0])).fetchall()
    third = db.execute("SELECT id FROM imgembed.search_image('photos', %s, 3)", (query,)).fetchall()[2]
    assert after == [third]
    near = db.execute("SELECT id FROM imgembed.search_image('photos', %s, 10, max_distance => %s)",
                      (query, first[1])).fetchall()
    assert near == [(first[0],)]

    # The very bytes of a row: the workers reuse that row's vector (distance 0) instead of embedding:
    # the batch that wrote it reused one vector and put no image through the model.
    worker_log = next(process.log_path for process in services.processes if "worker" in process.log_path.name)
    logged = worker_log.read_text().count("\n")
    exact = db.execute("SELECT id, distance FROM imgembed.search_image('photos', %s, 1, timeout_seconds => 60)",
                       (PHOTOS[7].read_bytes(),)).fetchone()
    assert exact[0] == "7" and exact[1] == pytest.approx(0, abs=1e-6)
    batches = wait_for(lambda: [line for line in worker_log.read_text().splitlines()[logged:] if " batch claim=" in line],
                       60, "the batch's log line")  # written just after the batch commits
    assert len(batches) == 1 and "jobs=1 written=1" in batches[0] and "reused=1 images=0" in batches[0], batches

    # By location: a file the workers read, under the same rules as watched columns.
    copy = tmp_path / "uploads" / "upload.jpg"
    copy.write_bytes(_reencoded(PHOTOS[11], scale=0.5, quality=60))
    at = db.execute("SELECT id FROM imgembed.search_image_at('photos', %s, 1, timeout_seconds => 60)",
                    (str(copy),)).fetchone()
    assert at == ("11",)
    typed_at = db.execute("SELECT id FROM imgembed.search_image_at('photos', NULL::bigint, %s, 1)", (str(copy),)).fetchone()
    assert typed_at == (11,)

    # The owner forgets query images by deleting them: their vectors go with them.
    kept = db.execute("SELECT imgembed.storage_table('imgembed.image_query')").fetchone()[0]
    assert db.execute(f"SELECT count(*) FROM {kept}").fetchone()[0] > 0
    db.execute("DELETE FROM imgembed.image_query")
    assert db.execute(f"SELECT count(*) FROM {kept}").fetchone()[0] == 0


def test_bad_query_images_fail_clearly(photos: psycopg.Connection, tmp_path: Path) -> None:
    db = photos
    with pytest.raises(psycopg.Error, match="could not be embedded: not an image"):
        db.execute("SELECT * FROM imgembed.search_image('photos', %s, timeout_seconds => 60)", (b"not an image at all",))
    with pytest.raises(psycopg.Error, match="could not be embedded"):  # remembered: at once the second time
        db.execute("SELECT * FROM imgembed.search_image('photos', %s, timeout_seconds => 0)", (b"not an image at all",))
    # A path outside IMGEMBED_ALLOWED_ROOTS: one answer, whether a file is there or not.
    for outside in (PHOTOS[0], tmp_path / "absent.jpg"):
        with pytest.raises(psycopg.Error, match=f"could not be embedded: outside allowed roots: {outside}"):
            db.execute("SELECT * FROM imgembed.search_image_at('photos', %s, timeout_seconds => 60)", (str(outside),))
    missing = tmp_path / "uploads" / "nowhere.jpg"
    with pytest.raises(psycopg.Error, match="could not be embedded: file not found: .*nowhere.jpg"):
        db.execute("SELECT * FROM imgembed.search_image_at('photos', %s, timeout_seconds => 60)", (str(missing),))
    # The file appears: asking again reads it again.
    missing.write_bytes(_reencoded(PHOTOS[3]))
    assert db.execute("SELECT id FROM imgembed.search_image_at('photos', %s, 1, timeout_seconds => 60)",
                      (str(missing),)).fetchone() == ("3",)
    for image, message in ((b"", "empty"), (None, "NULL")):
        with pytest.raises(psycopg.Error, match=message):
            db.execute("SELECT * FROM imgembed.search_image('photos', %s::bytea)", (image,))
    with pytest.raises(psycopg.Error, match="not watched"):
        db.execute("SELECT * FROM imgembed.search_image('pg_class', %s)", (PHOTOS[0].read_bytes(),))


def test_search_image_without_a_worker_times_out_clearly(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE photos (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('photos', 'image')")
    with pytest.raises(psycopg.Error, match="no vector for the query image .* after 1 s") as raised:
        db.execute("SELECT * FROM imgembed.search_image('photos', %s, timeout_seconds => 1)", (PHOTOS[0].read_bytes(),))
    assert "worker" in (raised.value.diag.message_hint or "")
