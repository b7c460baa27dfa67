"""The pipeline spine: catalog, queue, ready image table, triggers and status.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0001_pipeline_spine.sql")


def downgrade() -> None:
    apply_revision_sql("0001_pipeline_spine_down.sql")
