"""Alembic migrations: upgrade, downgrade to base, upgrade again, with user data present."""

from __future__ import annotations

from collections.abc import Callable

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
    assert migrate.current_revision(url) == "0001"
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
    assert migrate.current_revision(url) == "0001"
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
