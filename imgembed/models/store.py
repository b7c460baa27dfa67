"""The model directory (``IMGEMBED_MODEL_DIR``): checkpoints kept on this host, so that workers load
``ARCH:TAG`` models without the network. ``imgembed models pull`` fills it from OpenCLIP's hub,
``imgembed models import`` from a local file; copy the directory to hosts without internet.

Layout: ``<dir>/<architecture>/<tag>/<checkpoint file>`` and, beside it, ``imgembed.json``: the
model's name, the file, its sha256 and where it came from. Files are written beside their final
name and renamed over it, so a worker never reads half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imgembed.models.names import ModelSpec, ModelSpecError, embedding_dimension, file_sha256

MANIFEST = "imgembed.json"


@dataclass(frozen=True)
class StoredCheckpoint:
    name: str
    path: Path
    sha256: str
    source: str


def entry_dir(model_dir: Path, spec: ModelSpec) -> Path:
    """Where the directory keeps the weights of an ``ARCH:TAG`` model."""
    if spec.pretrained is None or spec.checkpoint_path is not None or "/" in spec.pretrained:
        raise ModelSpecError(f"{spec.name}: the model directory keeps ARCH:TAG models (a tag, not a path)")
    return model_dir / spec.architecture / spec.pretrained


def stored_checkpoint(model_dir: Path, spec: ModelSpec) -> StoredCheckpoint | None:
    """The directory's checkpoint for this model, or None when it holds none."""
    if spec.pretrained is None or spec.checkpoint_path is not None or "/" in spec.pretrained:
        return None
    manifest = entry_dir(model_dir, spec) / MANIFEST
    try:
        entry = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = manifest.parent / entry["file"]
    return StoredCheckpoint(entry["name"], path, entry["sha256"], entry["source"]) if path.is_file() else None


def _write_atomically(target: Path, write: object) -> None:
    """Write through a temporary file in the same folder, then rename it over ``target``."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)  # type: ignore[operator]
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_checkpoint(model_dir: Path, spec: ModelSpec, source_file: Path, source: str) -> StoredCheckpoint:
    """Copy ``source_file`` into the directory as the weights of ``spec`` (replacing what was
    there) and describe it in its manifest."""
    embedding_dimension(spec)  # an architecture imgembed knows, or a clear error
    if not source_file.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {source_file}")
    folder = entry_dir(model_dir, spec)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source_file.name
    with source_file.open("rb") as original:
        _write_atomically(target, lambda out: shutil.copyfileobj(original, out, 1 << 20))
    stored = StoredCheckpoint(spec.name, target, file_sha256(target), source)
    manifest = {"name": stored.name, "file": target.name, "sha256": stored.sha256, "source": source}
    _write_atomically(folder / MANIFEST, lambda out: out.write(json.dumps(manifest, indent=1).encode() + b"\n"))
    return stored
