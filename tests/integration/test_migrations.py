"""Alembic migrations: upgrade, downgrade to base, upgrade again, with user data present; released
revisions frozen, and a database made by a released revision upgraded to what a fresh install is."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg

from imgembed import migrate
from imgembed.db import connect
from imgembed.migrations.releases import released_definitions
from imgembed.migrations.sql_files import with_vector_schema
from imgembed.models.registry import register_model
from tests.conftest import HEAD_REVISION, REPO, TEST_MODEL, as_role, comparable_dump
from tests.hostile import (
    called_names,
    create_decoy_log,
    decoys_that_ran,
    foreign_dependencies,
    plant_decoys,
    shipped_sql,
)


def watched_shop_with_vectors(connection: psycopg.Connection, rows: int, seed: int) -> tuple[str, np.ndarray]:
    """A table ``shop`` of ``rows`` rows watched with a 512-dim model registered as 'old-512', and a
    stored unit vector for each row, as workers would have written them. Returns the vector table's
    name and the vectors."""
    vectors = np.random.default_rng(seed).normal(size=(rows, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    connection.execute("SELECT imgembed.register_model('old-512', 'old', NULL, 512)")
    connection.execute("CREATE TABLE shop (id bigint PRIMARY KEY, photo bytea, kind text)")
    connection.execute("INSERT INTO shop SELECT g, 'x', 'k' || (g %% 3) FROM generate_series(0, %s) g", (rows - 1,))
    connection.execute("SELECT imgembed.watch('shop', 'photo', label_column => 'kind', model => 'old-512')")
    storage = connection.execute(  # the vector table's bare name, at every revision
        "SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
        "WHERE w.tbl = 'shop'::regclass AND wm.is_default"
    ).fetchone()[0]
    with connection.cursor() as cursor, cursor.copy(
        f"COPY imgembed.{storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "vector", "bigint"])
        for key, vector in enumerate(vectors):
            copy.write_row((key, vector, 0))
    return storage, vectors


def imgembed_objects(url: str) -> int:
    with connect(url) as connection:
        return connection.execute(
            "SELECT coalesce((SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid)"
            " + (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid)"
            " FROM pg_namespace n WHERE nspname = 'imgembed'), 0)"
        ).fetchone()[0]


def test_upgrade_downgrade_upgrade_keeps_user_tables(fresh_database: Callable[[str | None], str]) -> None:
    import psycopg

    url = fresh_database(None)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION vector")
        connection.execute("CREATE TABLE shop (id bigint PRIMARY KEY, photo bytea, note text)")
        connection.execute("INSERT INTO shop SELECT g, 'img', 'n' || g FROM generate_series(1, 25) g")
        connection.execute("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
        connection.execute("INSERT INTO public.alembic_version VALUES ('app_rev_1')")

    migrate.upgrade(url)
    assert migrate.current_revision(url) == HEAD_REVISION
    migrate.upgrade(url)  # a second run is a no-op
    with connect(url) as connection:
        register_model(connection, "imgembed-tiny")
        connection.execute("SELECT imgembed.watch('shop', 'photo')")
        connection.execute("SELECT imgembed.expand_intake()")
        assert connection.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 25

    migrate.downgrade(url, "base")
    assert migrate.current_revision(url) is None
    assert imgembed_objects(url) == 0
    with connect(url) as connection:
        assert connection.execute("SELECT count(*), min(note) FROM shop").fetchone() == (25, "n1")
        assert connection.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop'::regclass").fetchone()[0] == 0
        assert connection.execute("SELECT version_num FROM public.alembic_version").fetchone()[0] == "app_rev_1"
        connection.execute("INSERT INTO shop VALUES (26, 'x', 'still writable')")

    migrate.upgrade(url)
    assert migrate.current_revision(url) == HEAD_REVISION
    with connect(url) as connection:
        register_model(connection, "imgembed-tiny")
        connection.execute("SELECT imgembed.watch('shop', 'photo')")
        connection.execute("SELECT imgembed.expand_intake()")
        assert connection.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 26
        assert connection.execute("SELECT count(*) FROM shop").fetchone()[0] == 26


def test_functions_pin_search_path(database_url: str) -> None:
    with connect(database_url) as connection:
        unpinned = connection.execute(
            "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'imgembed'::regnamespace "
            "AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')"
        ).fetchall()
    assert unpinned == []


def test_offline_sql_is_printed(database_url: str, capsys: object) -> None:
    migrate.upgrade(database_url.replace("/t_", "/offline_"), sql_only=True)
    output = capsys.readouterr().out  # type: ignore[attr-defined]
    statements = [line for line in output.splitlines() if line.strip() and not line.startswith("--")]
    assert statements[:2] == ["BEGIN;", "SET LOCAL search_path = pg_catalog, imgembed, pg_temp;"]
    assert "CREATE TABLE imgembed.job" in output
    assert "CREATE OR REPLACE FUNCTION imgembed.finish_batch" in output


def test_revision_0002_converts_existing_vector_tables(fresh_database: Callable[[str | None], str]) -> None:
    """A database at 0001 with TOASTed vectors and a full-precision index: after 0002 the same
    vectors sit in the rows under a half-precision index, and search answers the same."""
    url = fresh_database(None)
    migrate.upgrade(url)
    migrate.downgrade(url, "0001")  # revision 0001's functions, index and storage
    with connect(url) as connection:
        storage, vectors = watched_shop_with_vectors(connection, 300, seed=3)

        def toasted() -> int:
            toast = connection.execute(
                "SELECT reltoastrelid::regclass FROM pg_class WHERE oid = %s::regclass", (f"imgembed.{storage}",)
            ).fetchone()[0]
            return connection.execute(f"SELECT count(*) FROM {toast}").fetchone()[0]

        def index_definition() -> str:
            return connection.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (storage + "_hnsw",)).fetchone()[0]

        def nearest() -> list[tuple[int, float]]:
            return connection.execute("SELECT id, distance FROM imgembed.similar('shop', 7::bigint, 5)").fetchall()

        assert toasted() > 0 and "vector_cosine_ops" in index_definition()
        before = nearest()

        migrate.upgrade(url)
        assert migrate.current_revision(url) == HEAD_REVISION
        assert toasted() == 0
        assert "halfvec(512)" in index_definition() and "halfvec_cosine_ops" in index_definition()
        after = nearest()
        assert [key for key, _ in after] == [key for key, _ in before]
        np.testing.assert_allclose([d for _, d in after], [d for _, d in before], atol=1e-6)
        connection.execute("SET enable_seqscan = off")  # 300 rows: the planner would rather scan them
        plan = "\n".join(row[0] for row in connection.execute(
            f"EXPLAIN SELECT id FROM imgembed.{storage} ORDER BY embedding::halfvec(512) <=> %s::vector::halfvec(512) LIMIT 5",
            (vectors[0],)))
        assert storage + "_hnsw" in plan


def test_revision_0003_orders_index_builds(fresh_database: Callable[[str | None], str]) -> None:
    """0003 makes index builds read the table from its first page; its downgrade undoes only that."""
    url = fresh_database(None)

    def build_settings() -> list[str]:
        with connect(url) as connection:
            return connection.execute(
                "SELECT proconfig FROM pg_proc WHERE oid = 'imgembed._create_index'::regproc").fetchone()[0]

    migrate.upgrade(url)
    assert "synchronize_seqscans=off" in build_settings()
    migrate.downgrade(url, "0002")
    assert not any(setting.startswith("synchronize_seqscans") for setting in build_settings())
    assert any(setting.startswith("search_path") for setting in build_settings())
    migrate.upgrade(url)
    assert "synchronize_seqscans=off" in build_settings()


def test_revision_0004_reports_unavailable_models(fresh_database: Callable[[str | None], str]) -> None:
    """0004 adds what a worker cannot load to its heartbeat; its downgrade restores 0003's."""
    url = fresh_database(None)

    def beat_arguments() -> list[str]:
        with connect(url) as connection:
            return [row[0] for row in connection.execute(
                "SELECT pg_get_function_identity_arguments(oid) FROM pg_proc WHERE proname = 'worker_beat'")]

    migrate.upgrade(url)
    assert beat_arguments() == ["p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint, "
                                "p_unavailable jsonb"]
    with connect(url) as connection:
        connection.execute("SELECT imgembed.worker_beat('w', 1, 'cpu', ARRAY['m'], 3, "
                           "'[{\"model\": \"m\", \"reason\": \"no file\", \"since\": \"2026-11-28T00:00:00+00:00\"}]')")
        assert connection.execute("SELECT model, reason, workers FROM imgembed.unavailable_models").fetchall() == [
            ("m", "no file", ["w"])]
    migrate.downgrade(url, "0003")
    assert beat_arguments() == ["p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint"]
    with connect(url) as connection:
        assert connection.execute("SELECT to_regclass('imgembed.unavailable_models')").fetchone()[0] is None
        assert connection.execute("SELECT worker, batches FROM imgembed.workers").fetchall() == [("w", 3)]
        assert connection.execute("SELECT proconfig IS NOT NULL AND prosecdef FROM pg_proc WHERE proname = 'worker_beat'"
                                  ).fetchone()[0]
    migrate.upgrade(url)
    assert len(beat_arguments()) == 1


RELEASED_0001 = REPO / "tests" / "fixtures" / "imgembed-0001-as-released.sql.gz"


def test_released_revisions_never_change() -> None:
    """Every revision file and every release's definitions match the checksums recorded when they
    were released (migrations/versions/SHA256SUMS, written by `python -m imgembed.migrations.releases
    freeze`); a file not recorded is a revision not frozen yet. Once, in 0.2.0, 0001, 0002 and the
    downgrades of 0002, 0004 and 0005 were amended for security (pgvector's objects named in its
    schema, since migrations no longer resolve names through the migrating role's search_path), and
    the downgrades' copies of sql/ moved into released_definitions.tar.xz."""
    from imgembed.migrations import releases

    assert releases.changed(REPO / "migrations") == []
    recorded = releases.read_checksums(REPO / "migrations")
    assert {f"versions/{path.name}" for path in (REPO / "migrations" / "versions").glob("0*")} <= recorded.keys()
    # The newest revision's definitions are sql/ as it stands: the next revision's downgrade puts them back.
    newest = sorted(entry.name for entry in (REPO / "sql").glob("*.sql"))
    assert releases.released_definitions(HEAD_REVISION) == [
        (name, (REPO / "sql" / name).read_text(encoding="utf-8")) for name in newest], (
        f"sql/ changed: python -m imgembed.migrations.releases freeze {HEAD_REVISION} --replace")
    # Each downgrade that puts back definitions names a release that holds them.
    for down in sorted((REPO / "migrations" / "versions").glob("*_down.sql")):
        for revision in re.findall(r"^--@definitions (\d{4})$", down.read_text(), flags=re.MULTILINE):
            assert releases.released_definitions(revision), down.name


def _populate(url: str) -> None:
    """What a user has in a database: a watched table with rows, their vectors, and ready-table rows."""
    with connect(url) as connection:
        watched_shop_with_vectors(connection, 40, seed=11)
        connection.execute("INSERT INTO imgembed.image (uri, label) VALUES ('/nowhere/a.jpg', 'a'), ('/nowhere/b.jpg', 'b')")


def _contents(url: str) -> dict[str, list[tuple[object, ...]]]:
    with connect(url) as connection:
        storage = connection.execute(  # the vector table's bare name, at every revision
            "SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
            "WHERE w.tbl = 'shop'::regclass AND wm.is_default"
        ).fetchone()[0]
        return {
            "vectors": connection.execute(f"SELECT id, embedding::text FROM imgembed.{storage} ORDER BY id").fetchall(),
            "shop": connection.execute("SELECT * FROM shop ORDER BY id").fetchall(),
            "images": connection.execute("SELECT id, uri, label FROM imgembed.image ORDER BY id").fetchall(),
            "jobs": connection.execute("SELECT watch_id, model_id, key, status FROM imgembed.job ORDER BY 1, 2, 3").fetchall(),
            "watches": connection.execute("SELECT id, tbl::text, key_column, key_type, content_column, uri_column, "
                                          "text_column, label_column FROM imgembed.watch ORDER BY id").fetchall(),
        }


def _by_table(url: str, dump: str) -> list[str]:
    """A dump's statements, sorted, with watch ids named by their tables: a database upgraded with
    rows already watched numbers the watches a later revision adds (imgembed.image_query, 0011)
    after the user's own, and pg_dump orders the vector tables by those names."""
    with connect(url) as connection:
        tables = dict(connection.execute("SELECT id, replace(tbl::text, '.', '_') FROM imgembed.watch").fetchall())
    dump = re.sub(r"\bemb_(\d+)_(\d+)", lambda match: f"emb_{tables[int(match[1])]}_{match[2]}", dump)
    dump = re.sub(r"(_on_\w+)\('(\d+)'\)", lambda match: f"{match[1]}('{tables[int(match[2])]}')", dump)
    return sorted(dump.split("\n\n"))


def _watch_ids_as_tables(contents: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    tables = {row[0]: row[1] for row in contents["watches"]}
    return {**contents, "watches": sorted(row[1:] for row in contents["watches"]),
            "jobs": sorted((tables[row[0]], *row[1:]) for row in contents["jobs"])}


def test_database_made_by_released_0001_upgrades_to_a_fresh_install(
    fresh_database: Callable[[str | None], str],
) -> None:
    """A database built by revision 0001 exactly as it was released (its SQL recovered from history),
    holding watched rows and vectors, upgraded to head: its schema is the same as a fresh install's,
    and no row or vector is lost."""
    old = fresh_database(None)
    with psycopg.connect(old, autocommit=True) as connection:
        connection.execute(gzip.decompress(RELEASED_0001.read_bytes()).decode())
    assert migrate.current_revision(old) == "0001"
    _populate(old)
    before = _contents(old)
    # A neighbour who may create objects in public, pgvector's schema, plants look-alikes of every
    # name imgembed's SQL calls before the upgrade: none runs, and nothing of imgembed is bound to one.
    neighbour = f"neighbour_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(old, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {neighbour} LOGIN")
        connection.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {neighbour}")
    with psycopg.connect(as_role(old, neighbour), autocommit=True) as planter:
        create_decoy_log(planter)
        plant_decoys(planter, called_names(shipped_sql()))
    migrate.upgrade(old, register=False)
    assert migrate.current_revision(old) == HEAD_REVISION
    with psycopg.connect(old, autocommit=True) as connection:
        assert decoys_that_ran(connection) == []
        assert foreign_dependencies(connection) == []
        connection.execute(f"DROP OWNED BY {neighbour}")
        connection.execute(f"DROP ROLE {neighbour}")

    fresh = fresh_database(None)
    migrate.upgrade(fresh, register=False)
    _populate(fresh)
    assert _by_table(old, comparable_dump(old)) == _by_table(fresh, comparable_dump(fresh))
    after = _contents(old)
    assert _watch_ids_as_tables(after) == _watch_ids_as_tables(before) | {
        "watches": _watch_ids_as_tables(after)["watches"]}
    assert len(after["vectors"]) == 40 and _watch_ids_as_tables(after) == _watch_ids_as_tables(_contents(fresh))


def test_every_upgrade_applies_the_definitions_again(database_url: str) -> None:
    """A database at the newest revision gets the package's functions, views and grants at every
    `imgembed migrate`, and its data stays: a changed definition needs no new revision."""
    with connect(database_url) as connection:
        connection.execute("INSERT INTO imgembed.image (uri) VALUES ('/nowhere/a.jpg')")
        connection.execute("CREATE OR REPLACE FUNCTION imgembed.in_flight_count() RETURNS bigint "
                           "LANGUAGE sql AS 'SELECT -1::bigint'")
        connection.execute("ALTER FUNCTION imgembed.claim_batch(integer, double precision) SECURITY INVOKER")
        assert connection.execute("SELECT imgembed.in_flight_count()").fetchone()[0] == -1
    migrate.upgrade(database_url)
    with connect(database_url) as connection:
        assert connection.execute("SELECT imgembed.in_flight_count()").fetchone()[0] == 0
        assert connection.execute("SELECT prosecdef FROM pg_proc WHERE oid = "
                                  "'imgembed.claim_batch(integer, double precision)'::regprocedure").fetchone()[0]
        assert connection.execute("SELECT count(*) FROM imgembed.image").fetchone()[0] == 1


def test_sqlalchemy_definitions_match_the_migrated_database(database_url: str) -> None:
    """imgembed.schema describes the tables the migrations make (Alembic's own comparison finds no
    difference), so it can be trusted by applications and by autogenerate."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from imgembed.schema import SCHEMA, metadata

    def ours(name: str | None, kind: str, parents: dict[str, str | None]) -> bool:
        if kind == "schema":
            return name == SCHEMA
        if kind == "table" and name is not None and (name.startswith("emb_") or name == "alembic_version"):
            return False  # vector tables (one per watched table and model, made by watch()), Alembic's own
        return parents.get("schema_name") == SCHEMA

    engine = create_engine(migrate.sqlalchemy_url(database_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "include_schemas": True, "include_name": ours, "compare_server_default": True})
        assert compare_metadata(context, metadata) == []
    engine.dispose()


def test_downgraded_and_upgraded_again_equals_a_fresh_install(
    fresh_database: Callable[[str | None], str], template_database: str, pg_server: object,
) -> None:
    """Each downgrade puts back its revision's released definitions (released_definitions.tar.xz)
    and undoes its own changes: down to 0011, 0004 or 0001 and up again, the schema is a fresh
    install's."""
    fresh = fresh_database(template_database)
    made = re.compile(r"CREATE OR REPLACE FUNCTION imgembed\.(\w+)\(")
    newest = {name for path in (REPO / "sql").glob("*.sql") for name in made.findall(path.read_text())}
    for revision in ("0012", "0011", "0004", "0001"):
        url = fresh_database(template_database)
        migrate.downgrade(url, revision)
        assert migrate.current_revision(url) == revision
        if revision == "0012":  # nothing the newest definitions added stays behind
            released = {name for _, text in released_definitions("0012") for name in made.findall(text)}
            with connect(url) as connection:
                left = {row[0] for row in connection.execute(
                    "SELECT proname FROM pg_proc WHERE pronamespace = 'imgembed'::regnamespace")}
            assert left & (newest - released) == set()
        migrate.upgrade(url)
        assert _by_table(url, comparable_dump(url)) == _by_table(fresh, comparable_dump(fresh)), revision


def test_a_database_at_any_release_upgrades_to_a_fresh_install(
    fresh_database: Callable[[str | None], str], template_database: str,
) -> None:
    """A database that some release installed (revision 0004, 0008 or 0012, with a watched table and
    its vectors) upgraded to head: its schema is a fresh install's, and its rows and vectors stay."""
    fresh = fresh_database(None)
    migrate.upgrade(fresh, register=False)
    _populate(fresh)
    for revision in ("0004", "0008", "0012"):
        url = fresh_database(None)
        migrate.upgrade(url, revision, register=False)
        # What that release's own `imgembed migrate` applied at its newest revision: its definitions.
        with psycopg.connect(url, autocommit=True) as connection, connection.transaction():
            connection.execute("SET LOCAL search_path = pg_catalog, imgembed, pg_temp")
            for name, definition in released_definitions(revision):
                connection.execute(with_vector_schema(definition, name).encode())
        _populate(url)
        before = _contents(url)
        migrate.upgrade(url, register=False)
        assert migrate.current_revision(url) == HEAD_REVISION
        assert _by_table(url, comparable_dump(url)) == _by_table(fresh, comparable_dump(fresh)), revision
        after = _contents(url)
        assert after["vectors"] == before["vectors"] and after["shop"] == before["shop"], revision


def test_migrate_sql_needs_no_database_and_makes_the_same_database(
    fresh_database: Callable[[str | None], str], template_database: str,
) -> None:
    """`imgembed migrate --sql` with no DATABASE_URL prints SQL that, run by hand, gives the database
    a live `imgembed migrate` gives: schema, and the model registered as the default."""
    environment = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    environment.update(IMGEMBED_MODEL=TEST_MODEL, IMGEMBED_DATA_DIR=str(Path(tempfile.mkdtemp())))  # no `up` to find
    printed = subprocess.run([sys.executable, "-m", "imgembed", "migrate", "--sql"], cwd=REPO, env=environment,
                             capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and "COMMIT;" in printed.stdout, printed.stderr[-3000:]
    by_hand = fresh_database(None)
    with psycopg.connect(by_hand, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION vector")
        connection.execute(printed.stdout.encode())
        assert connection.execute("SELECT name FROM imgembed.model WHERE is_default").fetchone()[0] == TEST_MODEL
    live = fresh_database(template_database)
    assert comparable_dump(by_hand) == comparable_dump(live)
