"""Vectors remember the image content they came from (content_sha256), so that identical images are
embedded once; images that are in no table (a query image a customer uploads) are kept in
imgembed.image_query and embedded by the workers like text queries.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0011_content_and_query_images.sql")


def downgrade() -> None:
    apply_revision_sql("0011_content_and_query_images_down.sql")
