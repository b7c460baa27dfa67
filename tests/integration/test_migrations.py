"""Alembic migrations: upgrade, downgrade to base, upgrade again, with user data present."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import HEAD_REVISION
from worker import migrate
from worker.db import connect
from worker.models import register_model


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
    assert "CREATE TABLE imgembed.job" in output
    assert "CREATE OR REPLACE FUNCTION imgembed.finish_batch" in output


def test_revision_0002_converts_existing_vector_tables(fresh_database: Callable[[str | None], str]) -> None:
    """A database at 0001 with TOASTed vectors and a full-precision index: after 0002 the same
    vectors sit in the rows under a half-precision index, and search answers the same."""
    import numpy as np

    url = fresh_database(None)
    migrate.upgrade(url)
    migrate.downgrade(url, "0001")  # revision 0001's functions, index and storage
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with connect(url) as connection:
        connection.execute("SELECT imgembed.register_model('old-512', 'old', NULL, 512)")
        connection.execute("CREATE TABLE shop (id bigint PRIMARY KEY, photo bytea)")
        connection.execute("INSERT INTO shop SELECT g, 'x' FROM generate_series(0, 299) g")
        connection.execute("SELECT imgembed.watch('shop', 'photo', model => 'old-512')")
        storage = connection.execute("SELECT imgembed.storage_table('shop')").fetchone()[0]
        with connection.cursor() as cursor, cursor.copy(
            f"COPY imgembed.{storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bigint", "vector", "bigint"])
            for key, vector in enumerate(vectors):
                copy.write_row((key, vector, 0))

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
