"""Least privilege: log in as each role and check what it can and cannot do."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from imgembed.training.synthetic import random_shapes
from tests.conftest import Services, wait_for


def login_as(database_url: str, role: str) -> psycopg.Connection:
    return psycopg.connect(database_url.replace("postgres@", f"{role}@", 1), autocommit=True)


@pytest.fixture
def shop(db: psycopg.Connection) -> tuple[psycopg.Connection, str, str]:
    suffix = uuid.uuid4().hex[:8]
    reader, worker = f"reader_{suffix}", f"worker_{suffix}"
    db.execute(f"CREATE ROLE {reader} LOGIN IN ROLE imgembed_reader")
    db.execute(f"CREATE ROLE {worker} LOGIN IN ROLE imgembed_worker")
    db.execute("CREATE TABLE products (id bigint PRIMARY KEY, photo bytea, secret text)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO products VALUES (%s, %s, 'do not read')",
                           [(i, s.png_bytes()) for i, s in enumerate(random_shapes(12, seed=6))])
    db.execute("SELECT imgembed.watch('products', 'photo')")
    db.execute(f"GRANT SELECT ON products TO {reader}")
    yield db, reader, worker
    db.execute(f"DROP OWNED BY {reader}, {worker}")
    db.execute(f"DROP ROLE {reader}, {worker}")


def test_worker_role_runs_the_pipeline_without_reading_user_tables(
    shop: tuple[psycopg.Connection, str, str], services: Services, database_url: str
) -> None:
    db, _, worker = shop
    services.database_url = database_url.replace("postgres@", f"{worker}@", 1)
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT embedded = 12 FROM imgembed.status WHERE table_name = 'public.products'")
             .fetchone()[0], 180, "products embedded by processes logged in as the worker role")
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.workers WHERE alive").fetchone()[0] == 1, 30,
             "the worker's heartbeat")
    with login_as(database_url, worker) as connection:
        for statement in ("SELECT secret FROM products", "SELECT * FROM imgembed.job", "DELETE FROM imgembed.watch",
                          "SELECT * FROM imgembed.similar('products', 1::bigint)",
                          "INSERT INTO imgembed.text_query (query) VALUES ('x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)


def test_reader_role_searches_but_changes_nothing(shop: tuple[psycopg.Connection, str, str], database_url: str) -> None:
    db, reader, _ = shop
    storage = db.execute("SELECT imgembed.storage_table('products')").fetchone()[0]
    db.execute(f"INSERT INTO imgembed.{storage} SELECT g, array_fill(g::real + 1, ARRAY[64])::vector, 0 "
               "FROM generate_series(0, 11) g")
    with login_as(database_url, reader) as connection:
        assert len(connection.execute("SELECT * FROM imgembed.similar('products', 1::bigint, 3)").fetchall()) == 3
        assert connection.execute("SELECT count(*) FROM imgembed.status").fetchone()[0] >= 1
        assert connection.execute("SELECT imgembed.request_text('a red circle')").fetchone()[0] > 0
        for statement in ("SELECT imgembed.unwatch('products')", "DELETE FROM products",
                          "UPDATE imgembed.model SET dim = 1", "DELETE FROM imgembed.job",
                          "SELECT * FROM imgembed.claim_batch(10, 60)",
                          f"INSERT INTO imgembed.{storage} VALUES (99, array_fill(1::real, ARRAY[64])::vector, 0)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
