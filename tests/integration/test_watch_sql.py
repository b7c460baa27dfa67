"""watch() / unwatch() and the triggers, checked in SQL against a real PostgreSQL + pgvector."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import storage_of, wait_for


def jobs(db: psycopg.Connection, status: str = "pending") -> list[str]:
    """Jobs by status, after expanding what the triggers queued (as a dispatcher does)."""
    db.execute("SELECT imgembed.expand_intake(1000)")
    return [row[0] for row in db.execute("SELECT key FROM imgembed.job WHERE status = %s ORDER BY id", (status,))]


@pytest.fixture
def products(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("CREATE TABLE public.products (id bigint PRIMARY KEY, photo bytea, title text)")
    db.execute("INSERT INTO products VALUES (1, 'a', 'one'), (2, NULL, 'two')")
    return db


def test_watch_backfills_existing_rows_with_an_image(products: psycopg.Connection) -> None:
    watch_id = products.execute("SELECT imgembed.watch('public.products', 'photo')").fetchone()[0]
    assert watch_id > 0
    assert jobs(products) == ["1"]
    # Calling it again is a no-op returning the same id.
    assert products.execute("SELECT imgembed.watch('products', 'photo')").fetchone()[0] == watch_id
    assert jobs(products) == ["1"]


def test_triggers_enqueue_only_real_image_changes(products: psycopg.Connection) -> None:
    products.execute("SELECT imgembed.watch('products', 'photo')")
    products.execute("INSERT INTO products VALUES (3, 'c', 'three'), (4, NULL, 'four')")
    assert jobs(products) == ["1", "3"]
    products.execute("UPDATE products SET title = 'renamed'")  # other column: nothing new
    assert jobs(products) == ["1", "3"]
    products.execute("UPDATE products SET photo = 'd' WHERE id = 4")  # image set: enqueued
    assert jobs(products) == ["1", "3", "4"]
    products.execute("UPDATE imgembed.job SET status = 'in_flight' WHERE key = '1'")
    products.execute("UPDATE products SET photo = 'new' WHERE id = 1")  # changed while in flight
    assert jobs(products) == ["3", "4", "1"]
    products.execute("DELETE FROM products WHERE id = 3")
    assert "3" not in jobs(products)


def test_statement_sends_one_notification(products: psycopg.Connection, database_url: str) -> None:
    products.execute("SELECT imgembed.watch('products', 'photo')")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN imgembed_jobs")
        products.execute("INSERT INTO products SELECT g, 'x', 't' FROM generate_series(10, 1009) g")
        # A marker sent after the insert's commit arrives after every notification of that commit.
        products.execute("NOTIFY imgembed_jobs, 'marker'")
        received = []
        for notification in listener.notifies(timeout=60):
            if notification.payload == "marker":
                break
            received.append(notification.payload)
        else:
            pytest.fail("the marker notification did not arrive within 60 s")
    assert received == [""]


def test_delete_and_truncate_remove_vectors(products: psycopg.Connection) -> None:
    products.execute("SELECT imgembed.watch('products', 'photo')")
    storage = storage_of(products, "public.products")
    vector = "[" + ",".join(["0.125"] * 64) + "]"
    products.execute(f"INSERT INTO {storage} (id, embedding, job_id) VALUES (1, %s, 1)", (vector,))
    assert products.execute("SELECT imgembed.vector_of('products'::regclass, 1::bigint)::text").fetchone()[0] == vector
    products.execute("DELETE FROM products WHERE id = 1")
    assert products.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 0
    products.execute("INSERT INTO products VALUES (1, 'a', 'again')")
    products.execute(f"INSERT INTO {storage} (id, embedding, job_id) VALUES (1, %s, 9)", (vector,))
    products.execute("TRUNCATE products")
    assert products.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 0
    assert jobs(products) == []


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        ("", "SELECT imgembed.watch('no_such_table', 'photo')", 'relation "no_such_table" does not exist'),
        ("CREATE TABLE t (id bigint PRIMARY KEY, photo bytea)", "SELECT imgembed.watch('t', 'nope')",
         'column "nope" does not exist'),
        ("CREATE TABLE t (id bigint PRIMARY KEY, photo integer)", "SELECT imgembed.watch('t', 'photo')",
         "must be bytea"),
        ("CREATE TABLE t (a int, b int, photo bytea, PRIMARY KEY (a, b))", "SELECT imgembed.watch('t', 'photo')",
         "composite primary key"),
        ("CREATE TABLE t (id int, photo bytea)", "SELECT imgembed.watch('t', 'photo')", "has no primary key"),
        ("CREATE TABLE t (id numeric PRIMARY KEY, photo bytea)", "SELECT imgembed.watch('t', 'photo')",
         "does not support"),
        ("CREATE VIEW v AS SELECT 1 AS id, 'x'::bytea AS photo", "SELECT imgembed.watch('v', 'photo')",
         "is not a table"),
        ("", "SELECT imgembed.unwatch('imgembed.model')", "is not watched"),
        ("CREATE TABLE t (id bigint PRIMARY KEY, photo bytea)",
         "SELECT imgembed.watch('t; DROP TABLE t', 'photo')", "invalid name syntax"),
        ("CREATE TABLE t (id bigint PRIMARY KEY, photo bytea)",
         "SELECT imgembed.watch('t', 'photo\"; DROP TABLE t; --')", "does not exist"),
    ],
)
def test_bad_watch_calls_raise_clear_errors(db: psycopg.Connection, setup: str, call: str, message: str) -> None:
    if setup:
        db.execute(setup)
    with pytest.raises(psycopg.Error, match=message):
        db.execute(call)
    if setup.startswith("CREATE TABLE t "):
        assert db.execute("SELECT to_regclass('t') IS NOT NULL").fetchone()[0]


@pytest.mark.parametrize(("key_type", "key"), [("uuid", "6f1c2a9e-0d4b-4f63-9a51-3c2d8e7b1a00"),
                                              ("text", "it's a key, with spaces and é")])
def test_text_and_uuid_keys_keep_their_type(db: psycopg.Connection, key_type: str, key: str) -> None:
    db.execute(f"CREATE TABLE docs (id {key_type} PRIMARY KEY, path text)")
    db.execute("SELECT imgembed.watch('docs', 'path')")
    storage = storage_of(db, "public.docs")
    stored_type = db.execute(
        "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'id'",
        (f"{storage}",),
    ).fetchone()[0]
    assert stored_type == key_type
    db.execute("INSERT INTO docs VALUES (%s, '/images/a.jpg')", (key,))
    assert jobs(db) == [key]
    vector = "[" + ",".join(["0.125"] * 64) + "]"
    db.execute(f"INSERT INTO {storage} (id, embedding, job_id) VALUES (%s, %s, 1)", (key, vector))
    joined = db.execute(f"SELECT d.id::text FROM docs d JOIN {storage} e ON e.id = d.id").fetchall()
    assert joined == [(key,)]
    assert db.execute(f"SELECT imgembed.vector_of('docs', %s::{key_type}) IS NOT NULL", (key,)).fetchone()[0]


def test_unwatch_drops_vectors_and_triggers_but_not_the_table(products: psycopg.Connection) -> None:
    products.execute("SELECT imgembed.watch('products', 'photo')")
    storage = storage_of(products, "public.products")
    assert products.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{storage}",)).fetchone()[0]
    products.execute("SELECT imgembed.unwatch('products')")
    assert products.execute("SELECT to_regclass(%s) IS NULL", (f"{storage}",)).fetchone()[0]
    assert products.execute("SELECT count(*) FROM products").fetchone()[0] == 2
    assert products.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'products'::regclass").fetchone()[0] == 0
    assert products.execute("SELECT count(*) FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
                            "WHERE w.table_name = 'public.products'").fetchone()[0] == 0
    products.execute("INSERT INTO products VALUES (5, 'e', 'five')")
    assert jobs(products) == []


def test_ready_image_table_is_watched(db: psycopg.Connection) -> None:
    db.execute("INSERT INTO imgembed.image (uri) VALUES ('/tmp/a.jpg')")
    db.execute("INSERT INTO imgembed.image (content) VALUES ('\\x00')")
    assert len(jobs(db)) == 2
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO imgembed.image (uri, content) VALUES ('/tmp/a.jpg', '\\x00')")


def test_a_claim_that_expires_before_a_worker_starts_it_costs_no_attempt(products: psycopg.Connection) -> None:
    """Claims can wait in the broker past their lease (a slow or restarting worker): only a
    worker starting a claim counts an attempt, so waiting never makes a job fail."""
    db = products
    db.execute("SELECT imgembed.watch('products', 'photo')")
    db.execute("SELECT imgembed.expand_intake()")
    for _ in range(7):  # more rounds than IMGEMBED_MAX_ATTEMPTS
        db.execute("SELECT claim_id FROM imgembed.claim_batch(100, 0.001)")
        wait_for(lambda: db.execute("SELECT imgembed.recover_expired(5)").fetchone()[0] > 0, 30,
                 "the claim's lease to expire and the claim to be recovered")
    assert db.execute("SELECT count(*) FROM imgembed.job WHERE status = 'failed'").fetchone()[0] == 0
    assert db.execute("SELECT max(attempts) FROM imgembed.job").fetchone()[0] == 0
    assert "before a worker started" in db.execute("SELECT max(last_error) FROM imgembed.job").fetchone()[0]
    claim_id = db.execute("SELECT claim_id FROM imgembed.claim_batch(100, 60)").fetchone()[0]
    started = db.execute("SELECT * FROM imgembed.start_claim(%s, 60)", (claim_id,)).fetchall()
    assert started and db.execute("SELECT min(attempts), max(attempts) FROM imgembed.job").fetchone() == (1, 1)
