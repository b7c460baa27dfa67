"""The queue's SQL functions (``sql/40_queue.sql``) as typed Python calls: what the dispatcher
and the workers do to jobs."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import numpy as np
import psycopg


@dataclass(frozen=True)
class Claim:
    claim_id: UUID
    model_name: str
    job_ids: list[int]


QUERY_IMAGE_TABLE = "imgembed.image_query"  # the images readers ask about (search_image, search_image_at)


@dataclass(frozen=True)
class ClaimedImage:
    job_id: int
    key: str
    content: bytes | None
    uri: str | None
    text: str | None  # imgembed's own text tables (queries, label prompts)
    table_name: str = ""  # the watched table the row is in


@dataclass(frozen=True)
class JobFailure:
    job_id: int
    error: str
    retryable: bool


def expand_intake(connection: psycopg.Connection, max_rows: int = 100) -> int:
    """Turn queued intake rows (written by the triggers) into jobs; returns rows expanded."""
    return int(connection.execute("SELECT imgembed.expand_intake(%s)", (max_rows,)).fetchone()[0])  # type: ignore[index]


def claim_batch(connection: psycopg.Connection, batch_size: int, lease_seconds: float) -> Claim | None:
    row = connection.execute(
        "SELECT claim_id, model_name, job_ids FROM imgembed.claim_batch(%s, %s)", (batch_size, lease_seconds)
    ).fetchone()
    return Claim(row[0], row[1], list(row[2])) if row else None


def release_claim(connection: psycopg.Connection, claim_id: UUID) -> int:
    return int(connection.execute("SELECT imgembed.release_claim(%s)", (claim_id,)).fetchone()[0])  # type: ignore[index]


def expire_queries(connection: psycopg.Connection) -> int:
    """Texts and query images nobody asked for within their window go (imgembed.expire_queries)."""
    return int(connection.execute("SELECT imgembed.expire_queries()").fetchone()[0])  # type: ignore[index]


def recover_expired(connection: psycopg.Connection, max_attempts: int) -> int:
    return int(connection.execute("SELECT imgembed.recover_expired(%s)", (max_attempts,)).fetchone()[0])  # type: ignore[index]


def in_flight_count(connection: psycopg.Connection) -> int:
    return int(
        connection.execute("SELECT imgembed.in_flight_count()").fetchone()[0]  # type: ignore[index]
    )


def start_claim(connection: psycopg.Connection, claim_id: UUID, lease_seconds: float) -> list[int]:
    rows = connection.execute("SELECT * FROM imgembed.start_claim(%s, %s)", (claim_id, lease_seconds)).fetchall()
    return [row[0] for row in rows]


def claimed_images(connection: psycopg.Connection, claim_id: UUID) -> list[ClaimedImage]:
    # Binary results: image bytes arrive as they are, not as hex text twice their size that the
    # server must encode and the worker decode.
    rows = connection.execute(
        "SELECT job_id, key, content, uri, body, table_name FROM imgembed.claimed_images(%s)", (claim_id,), binary=True
    ).fetchall()
    return [ClaimedImage(*row) for row in rows]


def finish_batch(
    connection: psycopg.Connection,
    claim_id: UUID,
    done: Sequence[tuple[int, np.ndarray | None]],
    failures: Sequence[JobFailure],
    max_attempts: int,
    backoff_seconds: float,
    content_hashes: Mapping[int, bytes] | None = None,
) -> int:
    """Write vectors and complete jobs in one transaction; returns how many vectors were written.
    The vectors travel in pgvector's binary format (%b: 4 bytes a dimension, nothing to parse).
    ``content_hashes``: by job id, the SHA-256 of the image bytes its vector was made from."""
    hashes = content_hashes or {}
    row = connection.execute(
        "SELECT imgembed.finish_batch(%s, %s, %b::vector[], %s, %s, %s, %s, %s, %s)",
        (
            claim_id,
            [job_id for job_id, _ in done],
            [vector for _, vector in done],
            [failure.job_id for failure in failures],
            [failure.error for failure in failures],
            [failure.retryable for failure in failures],
            max_attempts,
            backoff_seconds,
            [hashes.get(job_id) for job_id, _ in done],
        ),
    ).fetchone()
    return int(row[0])  # type: ignore[index]


def vectors_by_content(connection: psycopg.Connection, model_name: str, hashes: Collection[bytes]) -> dict[bytes, np.ndarray]:
    """Vectors the model already made from image bytes with these SHA-256 hashes, in any table."""
    if not hashes:
        return {}
    rows = connection.execute("SELECT content_sha256, embedding FROM imgembed.vectors_by_content(%s, %s)",
                              (model_name, list(hashes)), binary=True).fetchall()
    return {bytes(row[0]): row[1].to_numpy() for row in rows}  # pgvector's Vector


def requeue_claim(connection: psycopg.Connection, claim_id: UUID, job_ids: Sequence[int], reason: str,
                  delay_seconds: float) -> int:
    """Hand jobs back to the queue without spending an attempt (see ``requeue_claim`` in SQL)."""
    row = connection.execute("SELECT imgembed.requeue_claim(%s, %s, %s, %s)",
                             (claim_id, list(job_ids), reason, delay_seconds)).fetchone()
    return int(row[0])  # type: ignore[index]


def backlog(connection: psycopg.Connection) -> list[tuple[str, str, int, int, float | None]]:
    """Per (table, model): rows queued, jobs in flight, seconds the oldest queued row has waited."""
    return [(row[0], row[1], int(row[2]), int(row[3]), row[4])
            for row in connection.execute("SELECT * FROM imgembed.backlog()")]

