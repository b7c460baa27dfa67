"""Half-precision HNSW indexes with full-precision re-ranking, vectors stored in the row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from migrations.sql_files import apply_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_sql("20_watch.sql", "60_search.sql", "upgrades/0002_halfvec_index.sql", "90_pin_search_path.sql")


def downgrade() -> None:
    apply_sql("upgrades/0002_halfvec_index_down.sql", "90_pin_search_path.sql")
