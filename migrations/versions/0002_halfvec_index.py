"""Half-precision HNSW indexes with full-precision re-ranking, vectors stored in the row; an
attempt is counted when a worker starts a claim, not when a dispatcher makes it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0002_halfvec_index.sql")


def downgrade() -> None:
    apply_revision_sql("0002_halfvec_index_down.sql")
