"""HNSW builds read the vector table in its physical order, so that the index a build makes does
not depend on which sequential scans of the table ran before it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0003_ordered_index_build.sql")


def downgrade() -> None:
    apply_revision_sql("0003_ordered_index_build_down.sql")
