"""The pipeline spine: catalog, queue, ready image table, triggers and status.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy.schema import CreateIndex, CreateTable

from migrations.sql_files import apply_sql
from schema import tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SPINE_TABLES = [
    tables.model, tables.watch, tables.watch_model, tables.job, tables.intake, tables.image,
    tables.text_query, tables.label_prompt, tables.interaction,
    tables.cluster_run, tables.cluster_member, tables.cluster_centre, tables.anomaly_threshold, tables.projection,
    tables.worker_heartbeat,
]


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    apply_sql("05_optional_extensions.sql")
    for table in SPINE_TABLES:
        op.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda index: index.name or ""):
            op.execute(CreateIndex(index))
    apply_sql(
        "10_catalog.sql",
        "20_watch.sql",
        "30_triggers.sql",
        "40_queue.sql",
        "50_status.sql",
        "60_search.sql",
        "61_text.sql",
        "62_labels.sql",
        "63_recommend.sql",
        "70_models.sql",
        "80_clusters.sql",
        "81_anomalies.sql",
        "90_pin_search_path.sql",
        "95_roles.sql",
    )
    # The ready-made table is watched out of the box: bytes in `content` or a location in `uri`.
    op.execute("SELECT imgembed._watch('imgembed.image', 'content', 'uri', 'label')")
    # Texts (search queries, zero-shot label prompts) go through the same queue and workers.
    op.execute("SELECT imgembed._watch('imgembed.text_query', NULL, NULL, p_text_column => 'query')")
    op.execute("SELECT imgembed._watch('imgembed.label_prompt', NULL, NULL, p_text_column => 'prompt')")


def downgrade() -> None:
    apply_sql("99_drop_all.sql")
