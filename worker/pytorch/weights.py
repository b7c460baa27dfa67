"""Where a model's weights come from, decided before OpenCLIP is asked to build it: a checkpoint
path as named, the model directory (IMGEMBED_MODEL_DIR), OpenCLIP's download cache, or a download
from the hub. When none of them can give the weights, the model fails to load at once, in one
line that says what to do, instead of after a minute of the hub client's retries."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from imgembed.models.names import ModelSpec
from imgembed.models.store import stored_checkpoint
from imgembed.worker.model_errors import ModelLoadError

HUB_PROBE_SECONDS = 3.0
HUB_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Weights:
    """The checkpoint file to load (None: seeded random weights), and the OpenCLIP pretrained tag
    whose preprocessing goes with it (None: the architecture's own)."""

    file: str | None
    tag: str | None


def _hub_target(tag_config: dict[str, object]) -> tuple[str, list[str]] | None:
    """(repository, file names to look for) of a tag kept on the Hugging Face hub."""
    hub = str(tag_config.get("hf_hub") or "")
    if not hub:
        return None
    repository, filename = os.path.split(hub)
    names = [filename] if filename else list(HUB_FILENAMES)
    if filename.endswith(".bin"):
        names.insert(0, filename.removesuffix(".bin") + ".safetensors")
    return repository, names


def _cached_download(tag_config: dict[str, object]) -> str | None:
    """A download of this tag that the hub client keeps from before, if any."""
    target = _hub_target(tag_config)
    if target is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    repository, names = target
    for name in names:
        found = try_to_load_from_cache(repository, name)
        if isinstance(found, str):
            return found
    return None


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here (offline mode, no route, no name), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or error})"


def require_checkpoint_file(spec: ModelSpec) -> None:
    """A model named by a checkpoint path needs that file (checked without loading OpenCLIP)."""
    checkpoint = spec.checkpoint_path
    if checkpoint is not None and not checkpoint.is_file():
        raise ModelLoadError(f"model {spec.name}: checkpoint file {checkpoint} does not exist")


def resolve_weights(spec: ModelSpec, model_dir: Path) -> Weights:
    """The weights ``spec`` names, found without the network where they are kept locally."""
    if spec.random_weights:
        return Weights(None, None)
    require_checkpoint_file(spec)
    checkpoint = spec.checkpoint_path
    if checkpoint is not None:
        return Weights(str(checkpoint), None)
    tag = spec.pretrained
    stored = stored_checkpoint(model_dir, spec)
    if stored is not None:
        return Weights(str(stored.path), tag)
    import open_clip

    tag_config = open_clip.get_pretrained_cfg(spec.architecture, tag)
    if not tag_config:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(spec.architecture)) or "none"
        raise ModelLoadError(f"model {spec.name}: OpenCLIP knows no tag {tag!r} for {spec.architecture} (its tags: "
                             f"{known}), and the model directory {model_dir} does not hold it")
    cached = _cached_download(tag_config)
    if cached is not None:
        return Weights(cached, tag)
    problem = hub_unreachable()
    if problem is not None:
        raise ModelLoadError(
            f"model {spec.name}: its weights are neither in the model directory {model_dir} nor downloaded before, "
            f"and {problem}; run `imgembed models pull {spec.name}` on a host with internet and copy its "
            "IMGEMBED_MODEL_DIR here, or set IMGEMBED_MODEL to a model this host has")
    try:
        return Weights(open_clip.download_pretrained(tag_config), tag)
    except Exception as error:  # noqa: BLE001 - the hub client raises many kinds
        raise ModelLoadError(f"model {spec.name}: downloading its weights failed: {type(error).__name__}: {error}"
                             ) from error


def weights_problem(spec: ModelSpec, model_dir: Path) -> str | None:
    """Why this host cannot have the model's weights (one line, with what to do), or None when it
    can: they are here, or can be downloaded now (which this does, once). timm's models: timm
    fetches them itself when a worker loads them."""
    if spec.is_timm:
        return None
    try:
        resolve_weights(spec, model_dir)
    except ModelLoadError as error:
        return str(error)
    return None
