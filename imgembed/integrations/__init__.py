"""imgembed inside an application's own code: SQLAlchemy selectables (``imgembed.integrations.sqlalchemy``)
and Alembic operations (``imgembed.integrations.alembic``)."""
