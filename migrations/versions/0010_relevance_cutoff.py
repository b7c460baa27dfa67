"""The search functions take a relevance cut-off, max_distance: only the rows at most that far of
the k nearest come back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0010_relevance_cutoff.sql")


def downgrade() -> None:
    apply_revision_sql("0010_relevance_cutoff_down.sql")
