"""Alembic environment for imgembed.

imgembed keeps its own version table, ``imgembed.alembic_version``, so an application's own
Alembic history in the same database is never touched. The database URL comes from the Alembic
config (set by ``worker.migrate``) and migrations hold an advisory lock so concurrent runs wait.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from schema import SCHEMA, metadata

MIGRATION_LOCK_ID = 0x1E6E_3BED  # pg_advisory_xact_lock key shared by every imgembed migration run
VERSION_TABLE = "alembic_version"


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
        context.get_context().impl.static_output(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};\n")
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        with connection.begin():
            connection.execute(text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": MIGRATION_LOCK_ID})
            connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=VERSION_TABLE,
                version_table_schema=SCHEMA,
                transactional_ddl=True,
            )
            context.run_migrations()
            remaining = connection.exec_driver_sql(
                f"SELECT count(*) FROM {SCHEMA}.{VERSION_TABLE}"
            ).scalar_one()
            if remaining == 0:  # downgraded to base: nothing of imgembed may stay behind
                connection.exec_driver_sql(f"DROP SCHEMA {SCHEMA} CASCADE")
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
