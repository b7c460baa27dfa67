"""Images with identical bytes are embedded once: the pictures of a claim grouped by the SHA-256 of
their bytes, each group prepared and embedded as one image, or given a vector the model already
made from the same bytes in any table (``imgembed.vectors_by_content``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from imgembed.images.image_error import ImageError


def content_hash(data: bytes) -> bytes:
    """The SHA-256 of image bytes, as imgembed keeps it beside each vector (PostgreSQL's sha256())."""
    return hashlib.sha256(data).digest()


@dataclass
class ContentGroups:
    """The jobs of a claim by the content they read: each distinct content once, in claim order."""

    jobs_by_hash: dict[bytes, list[int]] = field(default_factory=dict)
    data_by_hash: dict[bytes, bytes] = field(default_factory=dict)
    unreadable: list[tuple[int, ImageError]] = field(default_factory=list)

    def hash_of_job(self) -> dict[int, bytes]:
        return {job_id: digest for digest, job_ids in self.jobs_by_hash.items() for job_id in job_ids}


def hashed(data: bytes | ImageError) -> tuple[bytes, bytes] | ImageError:
    """Bytes read with their SHA-256 (in the reading thread: hashlib lets other threads run), or
    why they could not be read."""
    return data if isinstance(data, ImageError) else (data, content_hash(data))


def group_by_content(job_ids: Sequence[int], reads: Sequence[tuple[bytes, bytes] | ImageError]) -> ContentGroups:
    """Group jobs whose bytes (read with their hash, see ``hashed``) are identical; a job whose
    image could not be read stays alone with its error."""
    groups = ContentGroups()
    for job_id, read in zip(job_ids, reads, strict=True):
        if isinstance(read, ImageError):
            groups.unreadable.append((job_id, read))
            continue
        data, digest = read
        groups.jobs_by_hash.setdefault(digest, []).append(job_id)
        groups.data_by_hash.setdefault(digest, data)
    return groups
