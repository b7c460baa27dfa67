"""Commands on imgembed's schema and queue: migrate, status, retry."""

from __future__ import annotations

import argparse

from imgembed.cli.common import add_command
from imgembed.settings import Settings, require_database_url


def migrate(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed import migrate as migrations

    url = require_database_url(settings)
    if args.downgrade:
        migrations.downgrade(url, args.downgrade, sql_only=args.sql)
        if not args.sql:
            print(f"imgembed downgraded to {args.downgrade}")
        return 0
    migrations.upgrade(url, args.revision, sql_only=args.sql)
    if args.sql:
        return 0
    from imgembed.db import connect
    from imgembed.models.registry import default_model, register_model

    with connect(url) as connection:
        if not args.no_model:
            register_model(connection, settings.model, model_dir=settings.models_path)
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


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    command = add_command(commands, "migrate", migrate, "Install or upgrade imgembed's schema in DATABASE_URL "
                          "(Alembic), and register IMGEMBED_MODEL.")
    command.add_argument("--revision", default="head", help="target revision (default: head)")
    command.add_argument("--downgrade", metavar="REVISION",
                         help="downgrade to REVISION instead ('base' removes imgembed)")
    command.add_argument("--sql", action="store_true", help="print the SQL instead of running it (offline mode)")
    command.add_argument("--no-model", action="store_true", help="do not register IMGEMBED_MODEL")

    add_command(commands, "status", status,
                "Print the backlog per watched table and model, throughput, live workers and failures.")

    command = add_command(commands, "retry", retry,
                          "Queue failed jobs again (all, one table's, or those whose error contains REASON).")
    command.add_argument("--table", help="only this watched table")
    command.add_argument("--reason", help="only failures whose error contains this text")
