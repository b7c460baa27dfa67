"""Watches of replicated rows: ``watch(..., replicated => true)`` embeds the rows that a logical
replication subscription applies to the table (its triggers fire in replica sessions too).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0009_replicated_rows.sql")


def downgrade() -> None:
    apply_revision_sql("0009_replicated_rows_down.sql")
