"""SQLAlchemy definitions of the tables imgembed's Alembic migrations manage."""

from schema.tables import SCHEMA, metadata

__all__ = ["SCHEMA", "metadata"]
