"""``imgembed models pull``: a pretrained model's weights downloaded once, through OpenCLIP's hub
client (with its progress bar), into the model directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from imgembed.models.names import ModelSpec, ModelSpecError
from imgembed.models.store import StoredCheckpoint, add_checkpoint, entry_dir
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.weights import hub_unreachable


def pull(spec: ModelSpec, model_dir: Path) -> StoredCheckpoint:
    import open_clip

    entry_dir(model_dir, spec)  # an ARCH:TAG name, or a clear error
    tag_config = open_clip.get_pretrained_cfg(spec.architecture, spec.pretrained)
    if not tag_config:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(spec.architecture)) or "none"
        raise ModelSpecError(f"{spec.name}: OpenCLIP knows no tag {spec.pretrained!r} for {spec.architecture} "
                             f"(its tags: {known})")
    problem = hub_unreachable()
    if problem is not None:
        raise ModelLoadError(f"cannot download {spec.name}: {problem}")
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".download-") as download:
        try:
            downloaded = Path(open_clip.download_pretrained(tag_config, cache_dir=download))
        except Exception as error:  # noqa: BLE001 - the hub client raises many kinds
            raise ModelLoadError(f"cannot download {spec.name}: {type(error).__name__}: {error}") from error
        source = str(tag_config.get("hf_hub") or tag_config.get("url") or "OpenCLIP")
        return add_checkpoint(model_dir, spec, downloaded, source=f"downloaded from {source}")
