"""SQLAlchemy helpers: imgembed's SQL functions as selectables that join back to mapped classes.

    from sqlalchemy import select
    from imgembed.integrations.sqlalchemy import similar, search_text

    hits = similar(Product, 42, k=10)
    rows = session.execute(
        select(Product, hits.c.distance).join(hits, Product.id == hits.c.id).order_by(hits.c.distance)
    ).all()

Each helper returns a table-valued function alias whose ``id`` column has the mapped class's key
type; ``distance`` (or ``score``, or ``label`` / ``votes`` / ``confidence``) come beside it.
``vector_of`` is a scalar whose value comes back as a numpy array (``NumpyVector``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from pgvector.sqlalchemy import HALFVEC, SPARSEVEC, VECTOR, Vector  # re-exported for applications
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB, REGCLASS, REGCONFIG
from sqlalchemy.sql.functions import Function

__all__ = [
    "HALFVEC", "SPARSEVEC", "VECTOR", "Vector", "NumpyVector",
    "similar", "similar_to_vector", "search_text", "search_image", "search_hybrid", "knn_label", "classify", "recommend", "recommend_for_user",
    "near_duplicates", "vector_of",
]


class NumpyVector(sa.types.TypeDecorator[Any]):
    """pgvector's column type, read as a float32 numpy array (pgvector's own reads a list)."""

    impl = VECTOR
    cache_ok = True

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> np.ndarray | None:
        return None if value is None else np.asarray(value, dtype=np.float32)


def _table(mapped: Any) -> sa.Table:
    table = getattr(mapped, "__table__", mapped)
    if not isinstance(table, sa.Table):
        raise TypeError(f"expected a mapped class or a Table, got {mapped!r}")
    return table


def _regclass(mapped: Any) -> sa.ColumnElement[Any]:
    table = _table(mapped)
    return sa.cast(sa.literal(table.fullname if table.schema else f"public.{table.name}"), REGCLASS)


def _key_type(mapped: Any) -> sa.types.TypeEngine[Any]:
    keys = list(_table(mapped).primary_key.columns)
    if len(keys) != 1:
        raise TypeError(f"{_table(mapped).name} needs a single-column primary key")
    return keys[0].type


def _text(value: str | None) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(value, sa.Text), sa.Text)


def _filter(value: dict[str, Any] | None) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(None if value is None else json.dumps(value), sa.Text), JSONB)


def _int(value: int | None) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(value, sa.Integer), sa.Integer)


def _vector(values: Sequence[float]) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal("[" + ",".join(str(float(x)) for x in values) + "]", sa.Text), VECTOR())


def _cut_off(key_type: Any, max_distance: float | None) -> list[sa.ColumnElement[Any]]:
    """The arguments after ``exact`` up to ``max_distance`` (no page: after_distance and after_id
    NULL), or none when there is no cut-off."""
    if max_distance is None:
        return []
    return [sa.cast(sa.null(), sa.Float), sa.cast(sa.null(), key_type), sa.cast(sa.literal(max_distance), sa.Float)]


def _call(name: str, *arguments: Any) -> Function[Any]:
    return getattr(sa.func.imgembed, name)(*arguments)


def similar(mapped: Any, key: Any, k: int = 10, *, model: str | None = None, filter: dict[str, Any] | None = None,
            ef_search: int | None = None, exact: bool | None = None,
            max_distance: float | None = None) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    function = _call("similar", _regclass(mapped), sa.cast(sa.literal(key), key_type), k, _text(model),
                     _filter(filter), _int(ef_search), bool(exact), *_cut_off(key_type, max_distance))
    return function.table_valued(sa.column("id", key_type), sa.column("distance", sa.Float)).alias("similar")


def similar_to_vector(mapped: Any, vector: Sequence[float], k: int = 10, *, model: str | None = None,
                      filter: dict[str, Any] | None = None, exact: bool | None = None,
                      max_distance: float | None = None) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    function = _call("similar_to_vector", _regclass(mapped), sa.cast(sa.null(), key_type), _vector(vector), k,
                     _text(model), _filter(filter), _int(None), bool(exact), *_cut_off(key_type, max_distance))
    return function.table_valued(sa.column("id", key_type), sa.column("distance", sa.Float)).alias("similar_to_vector")


def search_text(mapped: Any, query: str, k: int = 10, *, model: str | None = None,
                filter: dict[str, Any] | None = None, timeout_seconds: float | None = None,
                max_distance: float | None = None) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    cut_off = [_int(None), False, *_cut_off(key_type, max_distance)] if max_distance is not None else []
    function = _call("search_text", _regclass(mapped), sa.cast(sa.null(), key_type), _text(query), k, _text(model),
                     _filter(filter), sa.cast(sa.literal(timeout_seconds or 5.0), sa.Float), *cut_off)
    return function.table_valued(sa.column("id", key_type), sa.column("distance", sa.Float)).alias("search_text")


def search_image(mapped: Any, image: bytes, k: int = 10, *, model: str | None = None,
                 filter: dict[str, Any] | None = None, timeout_seconds: float | None = None,
                 max_distance: float | None = None) -> sa.TableValuedAlias:
    """Rows whose images are nearest to image bytes that are in no table (embedded by the workers)."""
    key_type = _key_type(mapped)
    cut_off = [_int(None), False, *_cut_off(key_type, max_distance)] if max_distance is not None else []
    function = _call("search_image", _regclass(mapped), sa.cast(sa.null(), key_type),
                     sa.cast(sa.literal(image, sa.LargeBinary), BYTEA), k, _text(model), _filter(filter),
                     sa.cast(sa.literal(timeout_seconds or 5.0), sa.Float), *cut_off)
    return function.table_valued(sa.column("id", key_type), sa.column("distance", sa.Float)).alias("search_image")


def search_hybrid(mapped: Any, query: str, text_columns: Sequence[str], k: int = 10, *,
                  weights: tuple[float, float] = (1.0, 1.0), model: str | None = None,
                  filter: dict[str, Any] | None = None, timeout_seconds: float | None = None) -> sa.TableValuedAlias:
    """Full-text ranking of ``text_columns`` fused with the text-to-image ranking (see search_hybrid in SQL)."""
    key_type = _key_type(mapped)
    function = _call("search_hybrid", _regclass(mapped), sa.cast(sa.null(), key_type), _text(query), k,
                     sa.cast(sa.literal(list(text_columns), ARRAY(sa.Text)), ARRAY(sa.Text)),
                     sa.cast(sa.literal(list(weights), ARRAY(sa.Float)), ARRAY(sa.Float)), _text(model),
                     _filter(filter), sa.cast(sa.literal("english"), REGCONFIG), 100, 60,
                     sa.cast(sa.literal(timeout_seconds or 5.0), sa.Float))
    return function.table_valued(sa.column("id", key_type), sa.column("score", sa.Float),
                                 sa.column("text_rank", sa.Integer), sa.column("image_rank", sa.Integer)
                                 ).alias("search_hybrid")


def knn_label(mapped: Any, key: Any, k: int = 5, *, model: str | None = None,
              exact: bool | None = None) -> sa.TableValuedAlias:
    function = _call("knn_label", _regclass(mapped), sa.cast(sa.literal(key), _key_type(mapped)), k,
                     _text(model), bool(exact))
    return function.table_valued(
        sa.column("label", sa.Text), sa.column("votes", sa.Integer), sa.column("confidence", sa.Float)
    ).alias("knn_label")


def classify(mapped: Any, vector: Sequence[float], k: int = 5, *, model: str | None = None,
             exact: bool | None = None) -> sa.TableValuedAlias:
    function = _call("classify", _regclass(mapped), _vector(vector), k, _text(model), bool(exact))
    return function.table_valued(
        sa.column("label", sa.Text), sa.column("votes", sa.Integer), sa.column("confidence", sa.Float)
    ).alias("classify")


def recommend(mapped: Any, positives: Sequence[Any], negatives: Sequence[Any] = (), k: int = 10, *,
              model: str | None = None, filter: dict[str, Any] | None = None,
              exact: bool | None = None) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    array_type = ARRAY(key_type)
    function = _call("recommend", _regclass(mapped), sa.cast(sa.literal(list(positives), array_type), array_type),
                     sa.cast(sa.literal(list(negatives), array_type), array_type), k, _text(model),
                     _filter(filter), bool(exact))
    return function.table_valued(sa.column("id", key_type), sa.column("score", sa.Float)).alias("recommend")


def recommend_for_user(mapped: Any, user_id: str, k: int = 10, *, model: str | None = None,
                       filter: dict[str, Any] | None = None) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    function = _call("recommend_for_user", _regclass(mapped), sa.cast(sa.null(), key_type), _text(user_id), k,
                     _text(model), _filter(filter))
    return function.table_valued(sa.column("id", key_type), sa.column("score", sa.Float)).alias("recommend_for_user")


def near_duplicates(mapped: Any, max_distance: float = 0.02, *, model: str | None = None,
                    per_item: int = 10) -> sa.TableValuedAlias:
    key_type = _key_type(mapped)
    function = _call("near_duplicates", _regclass(mapped), sa.cast(sa.null(), key_type),
                     sa.cast(sa.literal(max_distance), sa.Float), _text(model), per_item)
    return function.table_valued(
        sa.column("a", key_type), sa.column("b", key_type), sa.column("distance", sa.Float)
    ).alias("near_duplicates")


def vector_of(mapped: Any, key: Any, *, model: str | None = None) -> sa.ColumnElement[Any]:
    """One row's stored vector (NULL before a worker has embedded it), loaded as a numpy array."""
    return sa.func.imgembed.vector_of(_regclass(mapped), sa.cast(sa.literal(key), _key_type(mapped)), _text(model),
                                      type_=NumpyVector())
