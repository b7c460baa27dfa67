"""Watched tables may change: a watch knows its columns by number, so it follows renames of the
columns, the table and its schema; what it cannot follow is listed by imgembed.watch_problems and
repaired by imgembed.repair_watches() (imgembed doctor --fix), at once by event triggers where a
superuser installed them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0007_schema_changes.sql")


def downgrade() -> None:
    apply_revision_sql("0007_schema_changes_down.sql")
