"""imgembed's Alembic environment and versions. Versions are thin: they apply files from sql/."""
