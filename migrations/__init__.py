"""imgembed's Alembic environment and revisions. A revision runs its own frozen SQL files, kept
beside it in ``versions/``; the definitions in ``sql/`` are applied again after every upgrade to the
newest revision (see ``sql_files``)."""
