"""Connections to PostgreSQL, with numpy vectors sent in pgvector's binary format."""

from __future__ import annotations

import struct

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.adapt import Dumper
from psycopg.pq import Format

NOTIFY_CHANNEL = "imgembed_jobs"


class NumpyVectorBinaryDumper(Dumper):
    """numpy arrays in pgvector's binary format, converted by numpy in one call (pgvector-python's
    own dumper goes through a Python list: about 0.5 ms a 512-dim vector, this about 5 µs)."""

    format = Format.BINARY

    def dump(self, obj: np.ndarray) -> bytes:
        values = np.ascontiguousarray(obj, dtype=">f4")
        if values.ndim != 1:
            raise ValueError(f"a vector must be one-dimensional, got shape {values.shape}")
        return struct.pack(">HH", values.shape[0], 0) + values.tobytes()


def connect(database_url: str, *, autocommit: bool = True, application_name: str = "imgembed") -> psycopg.Connection:
    connection = psycopg.connect(database_url, autocommit=autocommit, application_name=application_name)
    register_vector(connection)
    vector_type = connection.adapters.types.get("vector")
    if vector_type is not None:
        connection.adapters.register_dumper(
            np.ndarray, type("NumpyVectorDumper", (NumpyVectorBinaryDumper,), {"oid": vector_type.oid}))
    return connection


def as_array(value: object) -> np.ndarray:
    """A vector read from PostgreSQL (pgvector's Vector, or a sequence) as float32 numpy."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)
