"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from pathlib import Path

from imgembed.migrations.sql_files import apply_revision_sql

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

# This revision's own SQL, beside it: <this file's name>.sql and <this file's name>_down.sql. Tables,
# indexes and data changes go there, frozen once released; functions and views go in sql/.
SQL_FILE = Path(__file__).stem


def upgrade() -> None:
    apply_revision_sql(f"{SQL_FILE}.sql")


def downgrade() -> None:
    apply_revision_sql(f"{SQL_FILE}_down.sql")
