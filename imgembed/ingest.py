"""Putting image files into the ready-made table ``imgembed.image``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import psycopg

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".pgm", ".ppm"}


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {raw}")
    return files


def ingest_paths(
    connection: psycopg.Connection,
    paths: Sequence[str | Path],
    *,
    as_bytes: bool = False,
    label: str | None = None,
    labels: dict[Path, str] | None = None,
) -> int:
    files = image_files(paths)
    with connection.transaction(), connection.cursor() as cursor:
        with cursor.copy("COPY imgembed.image (uri, content, label) FROM STDIN") as copy:
            for path in files:
                row_label = (labels or {}).get(path, label)
                if as_bytes:
                    copy.write_row((None, path.read_bytes(), row_label))
                else:
                    copy.write_row((str(path), None, row_label))
    return len(files)
