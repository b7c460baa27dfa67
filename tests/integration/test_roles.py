"""Least privilege: log in as each role and check what it can and cannot do."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from imgembed.local.postgres import EmbeddedPostgres
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, TEST_MODEL, Services, as_role, wait_for


def login_as(database_url: str, role: str) -> psycopg.Connection:
    return psycopg.connect(as_role(database_url, role), autocommit=True)


# What changes imgembed's state, called with arguments that would succeed for its owner, so that the
# first thing refused is the change itself.
CHANGING_CALLS = (
    "SELECT imgembed.watch('unwatched', 'photo')",
    "SELECT imgembed.unwatch('products')",
    "SELECT imgembed.register_model('other', 'imgembed-tiny', NULL, 64)",
    "SELECT imgembed.add_model('products', 'spare')",
    "SELECT imgembed.use_model('products', 'second', force => true)",
    "SELECT imgembed.drop_model('products', 'second')",
    "SELECT imgembed.forget_model('spare')",
    "SELECT imgembed.retry_failed('products')",
    "SELECT imgembed.rebuild_index('products')",
    "SELECT imgembed.set_known_good('products', good_column => 'ok')",
    "SELECT imgembed.cluster('products')",
)


# A reader keeps its own interactions (likes, dislikes), which no other role sees.
OWN_INTERACTIONS = ("INSERT INTO imgembed.interaction DEFAULT VALUES", "DELETE FROM imgembed.interaction")


def table_statements(connection: psycopg.Connection, *, reads: bool) -> list[str]:
    """A write of each kind (and, with ``reads``, a read) on every table of imgembed's schema."""
    tables = [row[0] for row in connection.execute(
        "SELECT format('imgembed.%I', tablename) FROM pg_tables WHERE schemaname = 'imgembed' ORDER BY 1")]
    statements = []
    for table in tables:
        statements += [f"INSERT INTO {table} DEFAULT VALUES", f"DELETE FROM {table}", f"TRUNCATE {table}"]
        statements += [f"SELECT * FROM {table}"] if reads else []
    return statements


def assert_refused(connection: psycopg.Connection, statements: list[str] | tuple[str, ...]) -> None:
    allowed = []
    for statement in statements:
        try:
            connection.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            continue
        except psycopg.Error as error:
            allowed.append(f"{statement}: {type(error).__name__}: {error}")
        else:
            allowed.append(statement)
    assert allowed == [], "\n".join(allowed)


@pytest.fixture
def shop(db: psycopg.Connection) -> tuple[psycopg.Connection, str, str]:
    suffix = uuid.uuid4().hex[:8]
    reader, worker = f"reader_{suffix}", f"worker_{suffix}"
    db.execute(f"CREATE ROLE {reader} LOGIN IN ROLE imgembed_reader")
    db.execute(f"CREATE ROLE {worker} LOGIN IN ROLE imgembed_worker")
    db.execute("CREATE TABLE products (id bigint PRIMARY KEY, photo bytea, secret text, ok boolean)")
    db.execute("CREATE TABLE unwatched (id bigint PRIMARY KEY, photo bytea)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO products VALUES (%s, %s, 'do not read')",
                           [(i, s.png_bytes()) for i, s in enumerate(random_shapes(12, seed=6))])
    db.execute("SELECT imgembed.watch('products', 'photo')")
    db.execute("SELECT imgembed.register_model(name, 'imgembed-tiny', NULL, 64) FROM unnest(ARRAY['second', 'spare']) name")
    db.execute("SELECT imgembed.add_model('products', 'second')")
    db.execute(f"GRANT SELECT ON products, unwatched TO {reader}")
    yield db, reader, worker
    db.execute(f"DROP OWNED BY {reader}, {worker}")
    db.execute(f"DROP ROLE {reader}, {worker}")


def test_worker_role_runs_the_pipeline_without_reading_user_tables(
    shop: tuple[psycopg.Connection, str, str], services: Services, database_url: str
) -> None:
    db, _, worker = shop
    services.database_url = as_role(database_url, worker)
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT embedded = 12 FROM imgembed.status WHERE table_name = 'public.products'")
             .fetchone()[0], 180, "products embedded by processes logged in as the worker role")
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.workers WHERE alive").fetchone()[0] == 1, 30,
             "the worker's heartbeat")
    # A reduced model's fit, and the projections it writes, through the worker's functions alone.
    reduced = db.execute("SELECT imgembed.reduce('products', dims => 4)").fetchone()[0]
    wait_for(lambda: db.execute("SELECT status FROM imgembed.reductions").fetchone()[0] in ("done", "failed"), 120,
             "the fit")
    assert db.execute("SELECT status, error FROM imgembed.reductions").fetchone() == ("done", None)
    assert db.execute("SELECT embedded FROM imgembed.status WHERE table_name = 'public.products' AND model = %s",
                      (reduced,)).fetchone()[0] == 12
    with login_as(database_url, worker) as connection:
        # Not one table, imgembed's or the application's, and no change beyond its own functions.
        assert_refused(connection, ["SELECT secret FROM products", "DELETE FROM products",
                                    "SELECT * FROM imgembed.similar('products', 1::bigint)",
                                    *table_statements(db, reads=True), *CHANGING_CALLS])


def test_reader_role_searches_but_changes_nothing(shop: tuple[psycopg.Connection, str, str], database_url: str) -> None:
    db, reader, _ = shop
    storage = db.execute("SELECT imgembed.storage_table('products')").fetchone()[0]
    db.execute(f"INSERT INTO {storage} SELECT g, array_fill(g::real + 1, ARRAY[64])::vector, 0 "
               "FROM generate_series(0, 11) g")
    with login_as(database_url, reader) as connection:
        assert len(connection.execute("SELECT * FROM imgembed.similar('products', 1::bigint, 3)").fetchall()) == 3
        status = connection.execute('SELECT table_name, "rows", embedded FROM imgembed.status WHERE is_default '
                                    'ORDER BY 1').fetchall()
        # The tables it may read (texts are private: no reader sees them).
        assert status == [("imgembed.image", 0, 0), ("imgembed.label_prompt", 0, 0), ("public.products", 12, 12)]
        assert connection.execute("SELECT imgembed.request_text('a red circle')").fetchone()[0] > 0
        assert connection.execute("SELECT imgembed.request_image('\\x89504e470d0a1a0a')").fetchone()[0] > 0
        worker_calls = [f"SELECT * FROM imgembed.{call}" for call in (
            "claim_batch(10, 60)", "expand_intake()", "recover_expired(5)", "in_flight_count()",
            "claim_cluster_run(60, 5)", "claim_reduction(60, 5)", "worker_beat('w', 1, 'cpu', ARRAY['m'], 0, '[]')",
            "requeue_claim(gen_random_uuid(), ARRAY[1::bigint], 'x', 0)",
            "vectors_by_content('imgembed-tiny', ARRAY['\\x00'::bytea])")]
        assert_refused(connection, ["DELETE FROM products", "UPDATE products SET secret = 'x'",
                                    "SELECT * FROM imgembed.image_query", "SELECT * FROM imgembed.text_query",
                                    f"INSERT INTO {storage} VALUES (99, array_fill(1::real, ARRAY[64])::vector, 0)",
                                    *[statement for statement in table_statements(db, reads=False)
                                      if statement not in OWN_INTERACTIONS], *CHANGING_CALLS, *worker_calls])


def test_an_owner_without_createrole_is_told_what_a_dba_must_run(pg_server: EmbeddedPostgres) -> None:
    """`imgembed migrate` as a database owner that may not create roles nor dblink: it installs, and
    says, in imgembed's own lines, what a DBA runs for the rest."""
    suffix = uuid.uuid4().hex[:8]
    owner, database = f"plain_owner_{suffix}", f"plain_{suffix}"
    with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
        superuser.execute(f"CREATE ROLE {owner} LOGIN")
        superuser.execute(f"CREATE DATABASE {database} OWNER {owner}")
    try:
        with psycopg.connect(pg_server.socket_url(database), autocommit=True) as superuser:
            superuser.execute("CREATE EXTENSION vector")
        environment = {**os.environ, "DATABASE_URL": pg_server.socket_url(database, owner), "IMGEMBED_MODEL": TEST_MODEL}
        result = subprocess.run([sys.executable, "-m", "imgembed", "migrate"], cwd=REPO, env=environment,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        said = result.stderr
        assert "imgembed: cannot create the loopback login" in said and f"ALTER ROLE {owner} CREATEROLE" in said, said
        assert "CREATE EXTENSION dblink SCHEMA imgembed_dblink" in said, said
        assert "CREATE EVENT TRIGGER imgembed_ddl_end" in said, said
        assert "Traceback" not in said
    finally:
        with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
            superuser.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            superuser.execute(f"DROP ROLE IF EXISTS {owner}")
