"""Where a worker on the ONNX path finds a model's exported towers, and how they get there.

The model directory keeps them in ``onnx/<model>/<weights>/``: ``<weights>`` is drawn from what
the vectors depend on (the checkpoint's sha256, or for seeded random weights the seed and the
OpenCLIP version that draws them), so another checkpoint under the same model name is exported
anew, never mixed up. The first worker that needs a tower exports it, in a process of its own (it
needs PyTorch: imgembed.worker.onnx.export), holding a lock on the folder; workers starting at the
same moment wait for that lock and then read what it wrote. Files are renamed into place whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from imgembed.models.names import RANDOM_INIT_SEED, ModelSpec, file_sha256
from imgembed.models.store import stored_checkpoint
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.onnx.int8_weights import WEIGHT_BITS
from imgembed.worker.pytorch.weights import require_checkpoint_file

log = logging.getLogger(__name__)

# Raised when exports are made differently: older ones are then made again. 3: int8 weights per
# output channel, in 8 and in 7 bits, the patch convolution left float32.
EXPORT_FORMAT = 3
EXPORT_TIMEOUT_SECONDS = 1800.0


class OnnxUnsupported(Exception):
    """The tower cannot run on ONNX Runtime as the worker runs it (the exporter said why)."""


class ExportFailed(ModelLoadError):
    """The export itself could not be made (not the model's fault: PyTorch may still load it)."""


def _open_clip_version() -> str:
    try:
        return version("open_clip_torch")
    except PackageNotFoundError:
        return "unknown"


def weights_identity(spec: ModelSpec, model_dir: Path) -> str:
    """What the model's vectors depend on besides its architecture, as one string."""
    if spec.random_weights:
        return f"random seed {RANDOM_INIT_SEED}, open_clip {_open_clip_version()}"
    stored = stored_checkpoint(model_dir, spec)
    if stored is not None:
        return f"sha256 {stored.sha256}"
    checkpoint = spec.checkpoint_path
    if checkpoint is not None and checkpoint.is_file():
        return f"sha256 {file_sha256(checkpoint)}"
    return f"tag {spec.pretrained}"  # OpenCLIP's published weights of that tag, from its download cache


def export_dir(spec: ModelSpec, model_dir: Path) -> Path:
    """The folder of this model's exports for its current weights."""
    identity = f"{spec.architecture}|{weights_identity(spec, model_dir)}|format {EXPORT_FORMAT}"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name).strip("._")[:80] or "model"
    return model_dir / "onnx" / readable / hashlib.sha256(identity.encode()).hexdigest()[:20]


def _manifest(folder: Path, tower: str, quantize: str) -> dict | None:
    """The tower's manifest when its files are all there."""
    try:
        manifest = json.loads((folder / f"{tower}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = [manifest.get("file")]
    if quantize == "int8":
        variants = manifest.get("int8") or {}
        wanted += [variants.get(str(bits), {}).get("file") for bits in WEIGHT_BITS]
    return manifest if all(name and (folder / name).is_file() for name in wanted) else None


def _run_exporter(spec: ModelSpec, tower: str, folder: Path, quantize: str, model_dir: Path) -> dict:
    command = [sys.executable, "-m", "imgembed.worker.onnx.export", spec.name, tower, str(folder),
               "--model-dir", str(model_dir)]
    if quantize == "int8":
        command += ["--quantize", "int8"]
    log.info("model %s: exporting its %s tower to ONNX in %s (once per checkpoint)", spec.name, tower, folder)
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as error:
        raise ExportFailed(f"model {spec.name}: exporting its {tower} tower to ONNX took over "
                             f"{EXPORT_TIMEOUT_SECONDS:.0f} s") from error
    last_line = (finished.stdout.strip().splitlines() or [""])[-1]
    if finished.returncode == 3:
        raise OnnxUnsupported(json.loads(last_line)["unsupported"])
    if finished.returncode == 2:
        raise ModelLoadError(json.loads(last_line)["error"])
    if finished.returncode != 0:
        problem = (finished.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExportFailed(f"model {spec.name}: exporting its {tower} tower to ONNX failed: {problem}")
    return json.loads(last_line)


def exported_tower(spec: ModelSpec, tower: str, model_dir: Path, quantize: str) -> tuple[Path, dict]:
    """(folder, manifest) of the model's tower exported to ONNX, exported first if needed."""
    require_checkpoint_file(spec)  # a missing file is said at once, without an exporting process
    folder = export_dir(spec, model_dir)
    found = _manifest(folder, tower, quantize)
    if found is not None:
        return folder, found
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / ".lock").open("a")
    except OSError as error:
        raise ExportFailed(f"model {spec.name}: cannot write its ONNX export in {folder} ({error.strerror}); "
                             "make the model directory (IMGEMBED_MODEL_DIR) writable, or set IMGEMBED_RUNTIME=torch"
                             ) from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker exporting it: wait, then read its files
        found = _manifest(folder, tower, quantize)
        if found is None:
            _run_exporter(spec, tower, folder, quantize, model_dir)
            found = _manifest(folder, tower, quantize)
            if found is None:
                raise ExportFailed(f"model {spec.name}: the ONNX export of its {tower} tower left no files in {folder}")
    return folder, found
