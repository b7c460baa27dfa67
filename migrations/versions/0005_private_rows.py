"""Readers see only what they may SELECT: the owner's own settings (the loopback password of
search_text), and each role's interactions its own.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0005_private_rows.sql")


def downgrade() -> None:
    apply_revision_sql("0005_private_rows_down.sql")
