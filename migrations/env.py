"""Alembic environment for imgembed.

imgembed keeps its own version table, ``imgembed.alembic_version``, so an application's own
Alembic history in the same database is never touched. The database URL comes from the Alembic
config (set by ``imgembed.migrate``) and migrations hold an advisory lock so concurrent runs wait.
An upgrade that ends at the newest revision applies the definitions in ``sql/`` again, in the same
transaction (see ``imgembed.migrations.sql_files``).
"""

from __future__ import annotations

import sys

from alembic import context
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.errors import Diagnostic
from sqlalchemy import Connection, create_engine, pool, text

from imgembed.migrations.sql_files import apply_definitions, load_pgvector, pin_search_path
from imgembed.schema import SCHEMA, metadata

MIGRATION_LOCK_ID = 0x1E6E_3BED  # pg_advisory_xact_lock key shared by every imgembed migration run
VERSION_TABLE = "alembic_version"


def _newest_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(context.config).get_heads())


def _offline_target_is_newest() -> bool:
    """Offline, the database is not read: the SQL printed ends at the newest revision when the
    revision asked for is it ("head", or its id)."""
    target = context.get_revision_argument()
    targets = {target} if isinstance(target, str) else set(target or ())
    newest = _newest_revisions()
    return bool(targets) and all(name in ("head", "heads") or name in newest for name in targets)


def run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        pin_search_path(context.get_context())
        context.get_context().impl.static_output(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};\n")
        load_pgvector(context.get_context())
        context.run_migrations()
        if _offline_target_is_newest():
            apply_definitions(context.get_context())


def _finish_online(connection: Connection, migration_context: MigrationContext) -> None:
    """After the revisions ran: definitions again at the newest revision; nothing left at base."""
    current = set(migration_context.get_current_heads())
    if current and current == _newest_revisions():
        apply_definitions(migration_context)
    elif not current:  # downgraded to base: nothing of imgembed may stay behind
        connection.exec_driver_sql(f"DROP SCHEMA {SCHEMA} CASCADE")


def _say(diagnostic: Diagnostic) -> None:
    """imgembed's own notices (what a DBA must run, what is left out) reach whoever migrates."""
    message = diagnostic.message_primary or ""
    if message.startswith("imgembed:"):
        print(message, file=sys.stderr)


def run_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None, "imgembed.migrate sets sqlalchemy.url"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        with connection.begin():
            driver_connection = connection.connection.driver_connection
            if driver_connection is not None:
                driver_connection.add_notice_handler(_say)
            connection.exec_driver_sql("SET LOCAL search_path = pg_catalog, pg_temp")
            connection.execute(text("SELECT pg_catalog.pg_advisory_xact_lock(:lock_id)"), {"lock_id": MIGRATION_LOCK_ID})
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=VERSION_TABLE,
                version_table_schema=SCHEMA,
                transactional_ddl=True,
            )
            pin_search_path(context.get_context())
            load_pgvector(context.get_context())
            context.run_migrations()
            _finish_online(connection, context.get_context())
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
