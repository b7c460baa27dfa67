"""Registering models in the database's model registry (``imgembed.model``)."""

from __future__ import annotations

import psycopg

from worker.model_spec import embedding_dimension, file_sha256, parse_model_spec


def register_model(connection: psycopg.Connection, name: str, *, make_default: bool = False) -> int:
    """Register ``name`` (dimension read from its architecture's config, checksum of a local
    checkpoint) and return its id. The first model registered becomes the default."""
    spec = parse_model_spec(name)
    dim = embedding_dimension(spec)
    checkpoint = spec.checkpoint_path
    sha256 = file_sha256(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
    row = connection.execute(
        "SELECT imgembed.register_model(%s, %s, %s, %s, %s, %s)",
        (spec.name, spec.architecture, spec.pretrained, dim, sha256, make_default),
    ).fetchone()
    return int(row[0])  # type: ignore[index]


def default_model(connection: psycopg.Connection) -> str | None:
    row = connection.execute("SELECT name FROM imgembed.model WHERE is_default").fetchone()
    return row[0] if row else None
