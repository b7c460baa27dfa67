"""Run imgembed's Alembic migrations against a database URL."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config

PINNED_SEARCH_PATH = "SET search_path = pg_catalog, imgembed, pg_temp"


OFFLINE_URL = "postgresql://offline/offline"  # `migrate --sql` reads no database: Alembic needs a dialect only


def sqlalchemy_url(database_url: str) -> str:
    """The SQLAlchemy form of a libpq URL, using the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {database_url!r} (expected postgresql://...)")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("imgembed.migrations")))
    # '%' must be doubled for ConfigParser interpolation (passwords may contain it).
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", *, sql_only: bool = False, register: bool = True,
            model: str | None = None) -> None:
    """Install or upgrade imgembed's schema, then, as ``imgembed migrate`` does, register a model:
    ``model``, else the configured one (IMGEMBED_MODEL). The first model registered becomes the
    default of every watched table; ``register=False`` leaves the registry alone."""
    command.upgrade(alembic_config(database_url), revision, sql=sql_only)
    if not register:
        return
    from imgembed.models.registry import register_model, registration_sql
    from imgembed.settings import load_settings

    settings = load_settings()
    if sql_only:  # the same database as a live migrate: the model is registered too
        print(f"{PINNED_SEARCH_PATH};\n{registration_sql(model or settings.model, model_dir=settings.models_path)}")
        return
    from imgembed.db import connect

    with connect(database_url) as connection:
        connection.execute(PINNED_SEARCH_PATH)  # as the migration itself: no name from another role's schema
        register_model(connection, model or settings.model, model_dir=settings.models_path)


def downgrade(database_url: str, revision: str = "base", *, sql_only: bool = False) -> None:
    command.downgrade(alembic_config(database_url), revision, sql=sql_only)


def current_revision(database_url: str) -> str | None:
    """The applied imgembed revision, or None when imgembed is not installed."""
    import psycopg

    with psycopg.connect(database_url) as connection:
        (installed,) = connection.execute(
            "SELECT to_regclass('imgembed.alembic_version') IS NOT NULL"
        ).fetchone()  # type: ignore[misc]
        if not installed:
            return None
        version = connection.execute("SELECT version_num FROM imgembed.alembic_version").fetchone()
        return version[0] if version else None
