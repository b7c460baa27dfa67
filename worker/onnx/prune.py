"""ONNX exports that no worker of this version would load again: `imgembed models prune-exports`.

A model's exports live in a folder named after what its vectors depend on and the export format
(imgembed.worker.onnx.cache.export_dir). A newer export format, a new checkpoint under the same
name, or a new OpenCLIP version drawing random weights each start a new folder and leave the old
one behind. A folder is stale when the folder its manifest's model maps to now is another one.
Folders without a readable manifest (an export under way, or one that failed) are left alone, and
so is any folder whose lock another process holds.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from imgembed.models.names import ModelSpecError, parse_model_spec
from imgembed.worker.onnx.cache import export_dir


@dataclass(frozen=True)
class StaleExport:
    folder: Path
    model: str
    size_bytes: int


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _manifest_model(folder: Path) -> str | None:
    """The model a folder's manifests name, or None when none can be read."""
    for manifest in sorted(folder.glob("*.json")):
        try:
            model = json.loads(manifest.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(model, str):
            return model
    return None


def stale_exports(model_dir: Path) -> list[StaleExport]:
    """Export folders under ``model_dir/onnx`` that their model no longer maps to."""
    found = []
    for folder in sorted(model_dir.glob("onnx/*/*")):
        model = _manifest_model(folder) if folder.is_dir() else None
        if model is None:
            continue
        try:
            current = export_dir(parse_model_spec(model), model_dir)
        except ModelSpecError:
            current = None  # a name this version cannot read: nothing here loads it
        except OSError:
            continue  # its checkpoint cannot be read now: whether the folder is current cannot be told
        if current is None or current.resolve() != folder.resolve():
            found.append(StaleExport(folder, model, _folder_size(folder)))
    return found


def remove_export(folder: Path) -> bool:
    """Remove ``folder`` unless another process holds its lock, and its model's folder once empty;
    True when removed."""
    lock_path = folder / ".lock"
    if lock_path.exists():
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(folder)
    else:
        shutil.rmtree(folder)
    if not any(folder.parent.iterdir()):
        folder.parent.rmdir()
    return True
