"""SQLAlchemy definitions of the tables imgembed's Alembic migrations manage."""

from imgembed.schema.tables import SCHEMA, metadata

__all__ = ["SCHEMA", "metadata"]
