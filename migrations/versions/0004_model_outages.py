"""Workers report the models they cannot load (their rows wait instead of failing); jobs can be
handed back without spending an attempt.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0004_model_outages.sql")


def downgrade() -> None:
    apply_revision_sql("0004_model_outages_down.sql")
