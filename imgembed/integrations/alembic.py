"""Alembic operations for an application's own revisions. Importing this module registers them:

    from alembic import op
    import imgembed.integrations.alembic  # noqa: F401  (registers op.watch_images & co.)

    def upgrade():
        op.watch_images("products", "photo_url", label_column="category")
        op.add_image_model("products", "ViT-L-14:laion2b_s32b_b82k")

    def downgrade():
        op.drop_image_model("products", "ViT-L-14:laion2b_s32b_b82k")
        op.unwatch_images("products", "photo_url", label_column="category")

Each operation knows its reverse (``reverse()``), as Alembic's own operations do. They run the SQL
functions imgembed's migrations install, so imgembed must be migrated first (``imgembed migrate``);
they work offline (``alembic upgrade --sql``) as well.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from imgembed.models.names import embedding_dimension, parse_model_spec


def _qualified(table: str, schema: str | None) -> str:
    return f"{schema}.{table}" if schema else table


@Operations.register_operation("watch_images")
class WatchImagesOp(MigrateOperation):
    """``imgembed.watch(table, image_column, label_column, model, replicated)``: embed every row's
    image (``replicated=True``: the rows a logical replication subscription applies too)."""

    def __init__(self, table: str, image_column: str, *, label_column: str | None = None,
                 model: str | None = None, schema: str | None = None, replicated: bool | None = None) -> None:
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.model, self.schema, self.replicated = model, schema, replicated

    @classmethod
    def watch_images(cls, operations: Operations, table: str, image_column: str, **options: Any) -> Any:
        return operations.invoke(cls(table, image_column, **options))

    def reverse(self) -> "UnwatchImagesOp":
        return UnwatchImagesOp(self.table, self.image_column, label_column=self.label_column,
                               model=self.model, schema=self.schema)


@Operations.register_operation("unwatch_images")
class UnwatchImagesOp(MigrateOperation):
    """``imgembed.unwatch(table)``: drop the table's triggers, vectors and jobs (not the table).
    The image column and options are only needed to reverse it."""

    def __init__(self, table: str, image_column: str | None = None, *, label_column: str | None = None,
                 model: str | None = None, schema: str | None = None) -> None:
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.model, self.schema = model, schema

    @classmethod
    def unwatch_images(cls, operations: Operations, table: str, image_column: str | None = None, **options: Any) -> Any:
        return operations.invoke(cls(table, image_column, **options))

    def reverse(self) -> WatchImagesOp:
        if self.image_column is None:
            raise ValueError("unwatch_images(...) needs image_column to be reversible")
        return WatchImagesOp(self.table, self.image_column, label_column=self.label_column,
                             model=self.model, schema=self.schema)


@Operations.register_operation("add_image_model")
class AddImageModelOp(MigrateOperation):
    """Register ``model`` (if needed) and backfill ``table`` with it beside its current default."""

    def __init__(self, table: str, model: str, *, schema: str | None = None) -> None:
        self.table, self.model, self.schema = table, model, schema

    @classmethod
    def add_image_model(cls, operations: Operations, table: str, model: str, **options: Any) -> Any:
        return operations.invoke(cls(table, model, **options))

    def reverse(self) -> "DropImageModelOp":
        return DropImageModelOp(self.table, self.model, schema=self.schema)


@Operations.register_operation("drop_image_model")
class DropImageModelOp(MigrateOperation):
    """``imgembed.drop_model(table, model)``: that model's vectors and jobs on the table go."""

    def __init__(self, table: str, model: str, *, schema: str | None = None) -> None:
        self.table, self.model, self.schema = table, model, schema

    @classmethod
    def drop_image_model(cls, operations: Operations, table: str, model: str, **options: Any) -> Any:
        return operations.invoke(cls(table, model, **options))

    def reverse(self) -> AddImageModelOp:
        return AddImageModelOp(self.table, self.model, schema=self.schema)


def _run(operations: Operations, statement: str, **values: Any) -> None:
    operations.execute(sa.text(statement).bindparams(**values))


@Operations.implementation_for(WatchImagesOp)
def _watch_images(operations: Operations, operation: WatchImagesOp) -> None:
    _run(operations, "SELECT imgembed.watch(CAST(:tbl AS regclass), :image_column, label_column => :label_column, "
         "model => :model, replicated => :replicated)", tbl=_qualified(operation.table, operation.schema),
         image_column=operation.image_column, label_column=operation.label_column, model=operation.model,
         replicated=operation.replicated)


@Operations.implementation_for(UnwatchImagesOp)
def _unwatch_images(operations: Operations, operation: UnwatchImagesOp) -> None:
    _run(operations, "SELECT imgembed.unwatch(CAST(:tbl AS regclass))", tbl=_qualified(operation.table, operation.schema))


@Operations.implementation_for(AddImageModelOp)
def _add_image_model(operations: Operations, operation: AddImageModelOp) -> None:
    spec = parse_model_spec(operation.model)
    _run(operations, "SELECT imgembed.register_model(:name, :architecture, :pretrained, :dim)",
         name=spec.name, architecture=spec.architecture, pretrained=spec.pretrained, dim=embedding_dimension(spec))
    _run(operations, "SELECT imgembed.add_model(CAST(:tbl AS regclass), :model)",
         tbl=_qualified(operation.table, operation.schema), model=spec.name)


@Operations.implementation_for(DropImageModelOp)
def _drop_image_model(operations: Operations, operation: DropImageModelOp) -> None:
    """The model's vectors and jobs on the table go; when no image table uses the model any more
    (and it is not the default), it leaves the registry and the query tables too: the reverse of
    add_image_model, which registered it."""
    _run(operations, "SELECT imgembed.drop_model(CAST(:tbl AS regclass), :model)",
         tbl=_qualified(operation.table, operation.schema), model=operation.model)
    _run(operations, "SELECT imgembed.forget_model(m.name) FROM imgembed.model m "
         "WHERE m.name = :model AND NOT m.is_default AND NOT EXISTS ("
         "  SELECT 1 FROM imgembed.watch_model wm JOIN imgembed._live_watch w ON w.id = wm.watch_id "
         "   WHERE wm.model_id = m.id AND w.tbl <> ALL (imgembed._query_tables()))", model=operation.model)
