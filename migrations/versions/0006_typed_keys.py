"""Keys in their own type: every function returning one table's keys can return them in the
key's type, keyset paging takes the key in that type, ties are ordered by it; zero_shot waits for
prompts still being embedded; storage_table returns a regclass.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from imgembed.migrations.sql_files import apply_revision_sql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_revision_sql("0006_typed_keys.sql")


def downgrade() -> None:
    apply_revision_sql("0006_typed_keys_down.sql")
