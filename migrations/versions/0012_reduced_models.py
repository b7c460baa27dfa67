"""Reduced models: imgembed.reduce() fits PCA on a watched table's vectors and keeps the projected
vectors as a model of their own (imgembed.model.derived_from), with its own index.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0012_reduced_models.sql")


def downgrade() -> None:
    apply_revision_sql("0012_reduced_models_down.sql")
