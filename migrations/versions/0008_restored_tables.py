"""A watch remembers its table's OID: a table restored from a dump (another OID, columns perhaps
numbered anew) is found by its columns' names again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0008_restored_tables.sql")


def downgrade() -> None:
    apply_revision_sql("0008_restored_tables_down.sql")
