"""Query requests: which role asked for which text or query image, so that each role learns about
its own requests only, keeps to its own limits, forgets its own, and requests expire.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""

from pathlib import Path

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# This revision's own SQL, beside it: <this file's name>.sql and <this file's name>_down.sql.
SQL_FILE = Path(__file__).stem


def upgrade() -> None:
    apply_revision_sql(f"{SQL_FILE}.sql")


def downgrade() -> None:
    apply_revision_sql(f"{SQL_FILE}_down.sql")
