"""imgembed's own tables, in schema ``imgembed``.

Per-(table, model) vector tables are not here: ``imgembed.watch()`` creates them at run time with
the source table's key type and the model's dimension (see ``sql/20_watch.sql``).
"""

from __future__ import annotations

import sqlalchemy as sa
from pgvector.sqlalchemy import VECTOR
from sqlalchemy.dialects import postgresql as pg

SCHEMA = "imgembed"

metadata = sa.MetaData(schema=SCHEMA)

model = sa.Table(
    "model",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("architecture", sa.Text, nullable=False),
    sa.Column("pretrained", sa.Text),
    sa.Column("sha256", sa.Text),
    sa.Column("dim", sa.Integer, sa.CheckConstraint("dim > 0 AND dim <= 16000"), nullable=False),
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # false: an image-only model (timm's), which embeds no texts (revision 0011)
    sa.Column("text_tower", sa.Boolean, nullable=False, server_default=sa.true()),
    # a reduced model (imgembed.reduce): its vectors are projections of this model's (revision 0012)
    sa.Column("derived_from", sa.Integer, sa.ForeignKey("model.id")),
)
sa.Index("model_one_default", model.c.is_default, unique=True, postgresql_where=model.c.is_default)

watch = sa.Table(
    "watch",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("tbl", pg.REGCLASS, nullable=False, unique=True),
    sa.Column("table_name", sa.Text, nullable=False),
    sa.Column("key_column", sa.Text, nullable=False),
    sa.Column("key_type", sa.Text, nullable=False),
    sa.Column("content_column", sa.Text),
    sa.Column("uri_column", sa.Text),
    sa.Column("text_column", sa.Text),  # imgembed's own text tables: queries and label prompts
    sa.Column("label_column", sa.Text),
    # Known-good rows for anomaly scores: a boolean column, or a value of the label column.
    sa.Column("good_column", sa.Text),
    sa.Column("good_label", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # The same columns by number (pg_attribute.attnum): the watch follows their renames (revision 0007).
    sa.Column("key_attnum", sa.SmallInteger),
    sa.Column("content_attnum", sa.SmallInteger),
    sa.Column("uri_attnum", sa.SmallInteger),
    sa.Column("text_attnum", sa.SmallInteger),
    sa.Column("label_attnum", sa.SmallInteger),
    sa.Column("good_attnum", sa.SmallInteger),
    sa.Column("tbl_oid", pg.OID),  # the table's OID when watched: another one means it was restored (0008)
    # Rows a logical replication subscription applies are embedded too (watch(..., replicated => true); 0009).
    sa.Column("replicated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("num_nonnulls(content_column, uri_column, text_column) >= 1", name="watch_has_input_column"),
)

watch_model = sa.Table(
    "watch_model",
    metadata,
    sa.Column("watch_id", sa.Integer, sa.ForeignKey("watch.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("model.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("storage_table", sa.Text, nullable=False, unique=True),
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
sa.Index(
    "watch_model_one_default",
    watch_model.c.watch_id,
    unique=True,
    postgresql_where=watch_model.c.is_default,
)

job = sa.Table(
    "job",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    # No foreign keys here: triggers insert a job per changed row, and a referential check per row
    # would cost more than the insert. unwatch() and drop_model() delete their jobs themselves.
    sa.Column("watch_id", sa.Integer, nullable=False),
    sa.Column("model_id", sa.Integer, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column(
        "status",
        sa.Text,
        sa.CheckConstraint("status IN ('pending', 'in_flight', 'failed')", name="job_status_known"),
        nullable=False,
        server_default="pending",
    ),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_before", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("claim_id", pg.UUID),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text),
    sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
# At most one pending job per row and model: a second change before the embedding just waits.
sa.Index(
    "job_one_pending",
    job.c.watch_id,
    job.c.model_id,
    job.c.key,
    unique=True,
    postgresql_where=job.c.status == "pending",
)
sa.Index("job_pending_by_model", job.c.model_id, job.c.id, postgresql_where=job.c.status == "pending")
sa.Index("job_in_flight_lease", job.c.lease_until, postgresql_where=job.c.status == "in_flight")
sa.Index("job_claim", job.c.claim_id, postgresql_where=job.c.claim_id.is_not(None))
# Jobs in flight or failed, by row (pending ones are found through job_one_pending).
sa.Index("job_settled_by_row", job.c.watch_id, job.c.key, postgresql_where=job.c.status != "pending")

# What triggers write: one row per statement (and per 10,000 keys), holding the changed keys.
# Dispatchers expand it into jobs off the writer's path, so a bulk insert into a watched table
# costs one array, not one indexed job row per row.
intake = sa.Table(
    "intake",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("watch_id", sa.Integer, nullable=False),
    sa.Column("model_id", sa.Integer),  # NULL: every model attached when it is expanded
    sa.Column("keys", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
sa.Index("intake_by_watch", intake.c.watch_id)

image = sa.Table(
    "image",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("uri", sa.Text),
    sa.Column("content", sa.LargeBinary),
    sa.Column("label", sa.Text),
    sa.Column("metadata", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("num_nonnulls(uri, content) = 1", name="image_uri_xor_content"),
)

text_query = sa.Table(
    "text_query",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("query", sa.Text, sa.CheckConstraint("btrim(query) <> ''", name="text_query_not_blank"), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Who asked for each text and query image (revision 0013): a role learns about its own requests
# only, keeps to its own limits and forgets its own; requests expire.
query_request = sa.Table(
    "query_request",
    metadata,
    sa.Column("kind", sa.Text, sa.CheckConstraint("kind IN ('text', 'image')", name="query_request_kind_known"),
              primary_key=True),
    sa.Column("query_id", sa.BigInteger, primary_key=True),
    sa.Column("role_name", sa.Text, primary_key=True),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("query_request_of_role", "role_name", "kind", "requested_at"),
)

# Images that are in no watched table (search_image): one row per distinct content or location,
# embedded by the workers like text queries (revision 0011).
image_query = sa.Table(
    "image_query",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("content", sa.LargeBinary),
    sa.Column("content_sha256", sa.LargeBinary, unique=True),
    sa.Column("uri", sa.Text, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("num_nonnulls(content, uri) = 1", name="image_query_content_or_uri"),
    sa.CheckConstraint("(content IS NULL) = (content_sha256 IS NULL)", name="image_query_hash_of_content"),
)

label_prompt = sa.Table(
    "label_prompt",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, sa.CheckConstraint("btrim(prompt) <> ''", name="label_prompt_not_blank"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("label", "prompt"),
)

interaction = sa.Table(
    "interaction",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("tbl", pg.REGCLASS, nullable=False),
    sa.Column("item", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False, server_default="like"),
    sa.Column("weight", sa.REAL, nullable=False, server_default="1"),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # The role that recorded it: each role sees its own (row-level security; revision 0005).
    sa.Column("role_name", sa.Text, nullable=False, server_default=sa.text("CURRENT_USER")),
)
sa.Index("interaction_by_user", interaction.c.user_id, interaction.c.tbl)

# Settings only the owner reads: the loopback password of search_text (revision 0005).
private_setting = sa.Table(
    "private_setting",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

cluster_run = sa.Table(
    "cluster_run",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("watch_id", sa.Integer, sa.ForeignKey("watch.id", ondelete="CASCADE"), nullable=False),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("model.id", ondelete="CASCADE"), nullable=False),
    sa.Column("method", sa.Text, sa.CheckConstraint("method IN ('kmeans', 'minibatch_kmeans', 'hdbscan')",
                                                      name="cluster_method_known"), nullable=False),
    sa.Column("k_requested", sa.Integer),
    sa.Column("k", sa.Integer),
    sa.Column("quality", sa.Float),  # silhouette score (cosine) of the result
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')",
                                                      name="cluster_status_known"),
              nullable=False, server_default="pending"),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("params", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)
sa.Index("cluster_run_pending", cluster_run.c.id, postgresql_where=cluster_run.c.status == "pending")

cluster_member = sa.Table(
    "cluster_member",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("cluster_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("cluster", sa.Integer, nullable=False),  # -1: noise (HDBSCAN)
    sa.Column("distance", sa.Float),  # cosine distance to the cluster's centre
)

cluster_centre = sa.Table(
    "cluster_centre",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("cluster_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("cluster", sa.Integer, primary_key=True),
    sa.Column("centre", sa.Text, nullable=False),  # pgvector text form; cast to vector(dim) when read
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("medoid_key", sa.Text, nullable=False),
)

anomaly_threshold = sa.Table(
    "anomaly_threshold",
    metadata,
    sa.Column("watch_id", sa.Integer, sa.ForeignKey("watch.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("model.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("k", sa.Integer, nullable=False),
    sa.Column("quantile", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("good_rows", sa.Integer, nullable=False),
    sa.Column("calibrated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

projection = sa.Table(
    "projection",
    metadata,
    sa.Column("watch_id", sa.Integer, sa.ForeignKey("watch.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("model.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("method", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("x", sa.Float, nullable=False),
    sa.Column("y", sa.Float, nullable=False),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

reduction = sa.Table(
    "reduction",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("model.id", ondelete="CASCADE"), primary_key=True),
    # the table whose vectors the fit learns from (NULL once it is no longer watched)
    sa.Column("watch_id", sa.Integer, sa.ForeignKey("watch.id", ondelete="SET NULL")),
    sa.Column("method", sa.Text, sa.CheckConstraint("method IN ('pca')", name="reduction_method_known"),
              nullable=False, server_default="pca"),
    sa.Column("sample_rows", sa.Integer, sa.CheckConstraint("sample_rows > 0", name="reduction_sample_positive"),
              nullable=False),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')",
                                                      name="reduction_status_known"),
              nullable=False, server_default="pending"),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("fitted_rows", sa.Integer),
    sa.Column("explained_variance", sa.Float),  # share of the fitted vectors' variance the dimensions keep
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)
sa.Index("reduction_pending", reduction.c.model_id, postgresql_where=reduction.c.status == "pending")

# A reduced model's fit, one row per output dimension: a unit vector of the source model's space (the
# principal components, and the direction of the vectors' mean).
reduction_axis = sa.Table(
    "reduction_axis",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("reduction.model_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("axis", sa.Integer, primary_key=True),
    sa.Column("direction", VECTOR(), nullable=False),
)

worker_heartbeat = sa.Table(
    "worker_heartbeat",
    metadata,
    sa.Column("worker", sa.Text, primary_key=True),  # celery hostname, e.g. imgembed-1234@host
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("device", sa.Text, nullable=False),
    sa.Column("models", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("batches", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # Models the worker cannot load now: [{model, tower, reason, since}] (revision 0004).
    sa.Column("unavailable", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
)
