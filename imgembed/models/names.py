"""Model names as users write them, and what they mean. Pure: no torch import.

- ``imgembed-tiny``: the tiny architecture shipped in ``imgembed/models/configs`` with random weights
  from a fixed seed (for tests: same weights in every process);
- ``ARCH:TAG``: an OpenCLIP architecture with a pretrained tag (downloaded once by OpenCLIP);
- ``ARCH:/path/to/checkpoint.pt`` (or ``file://``): an architecture with a local checkpoint;
- ``ARCH``: the architecture with random weights from the fixed seed (speed measurements);
- ``imgembed-shapes``: a tiny CLIP trained by this project on generated shapes (weights shipped);
- ``timm:ARCH`` (seeded random weights), ``timm:ARCH.TAG`` (timm's pretrained weights, e.g.
  ``timm:resnet50.a1_in1k``) or ``timm:ARCH:/path/to/checkpoint.pth``: an image-only model from
  timm (no text tower), its pooled penultimate feature as the embedding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from imgembed.errors import ImgembedError

# Models whose trained weights ship with the package (see README: "A model made here").
BUNDLED_CHECKPOINTS = {"imgembed-shapes": "imgembed-shapes.pt"}
RANDOM_INIT_SEED = 20261127
TIMM_PREFIX = "timm:"
# The timm architectures whose output dimension imgembed ships (timm_dims.json): the classic CNN
# and ViT backbones, and timm's tiny test models.
TIMM_FAMILIES = ("resnet*", "resnext*", "wide_resnet*", "mobilenetv2_*", "mobilenetv3_*", "inception_v3",
                 "inception_v4", "vgg*", "vit_*", "deit_*", "convnext_*", "efficientnet_b*", "efficientnetv2_*",
                 "regnet*", "densenet*", "swin_*", "test_*")
TIMM_DIMS_FILE = Path(__file__).resolve().parent / "timm_dims.json"


def bundled_config_dir() -> Path:
    """The folder of the architectures' configurations shipped with imgembed (package data)."""
    return Path(str(files("imgembed.models") / "configs"))


def bundled_weights_dir() -> Path:
    """The folder of the trained weights shipped with imgembed (package data)."""
    return Path(str(files("imgembed.models") / "weights"))


class ModelSpecError(ImgembedError, ValueError):
    """A model name imgembed cannot interpret."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    pretrained: str | None  # a tag, a checkpoint path, or None for seeded random weights

    @property
    def checkpoint_path(self) -> Path | None:
        if self.pretrained and (self.pretrained.startswith(("/", "./", "~")) or self.pretrained.startswith("file://")):
            raw = self.pretrained.removeprefix("file://")
            return Path(raw).expanduser()
        return None

    @property
    def random_weights(self) -> bool:
        return self.pretrained is None

    @property
    def is_timm(self) -> bool:
        """An image-only model from timm."""
        return self.architecture.startswith(TIMM_PREFIX)

    @property
    def timm_architecture(self) -> str:
        return self.architecture.removeprefix(TIMM_PREFIX)

    @property
    def embeds_text(self) -> bool:
        """Whether the model has a text tower (CLIP models do; timm's image models do not)."""
        return not self.is_timm


def parse_model_spec(name: str) -> ModelSpec:
    text = name.strip()
    if not text:
        raise ModelSpecError("empty model name; use e.g. ViT-B-32:laion2b_s34b_b79k or imgembed-tiny")
    if text in BUNDLED_CHECKPOINTS:
        return ModelSpec(name=text, architecture=text, pretrained=str(bundled_weights_dir() / BUNDLED_CHECKPOINTS[text]))
    if text.startswith(TIMM_PREFIX):
        named, _, checkpoint = text.removeprefix(TIMM_PREFIX).partition(":")
        architecture, _, tag = named.partition(".")
        if not architecture:
            raise ModelSpecError(f"model name {name!r} names no timm architecture (e.g. timm:resnet50.a1_in1k)")
        return ModelSpec(name=text, architecture=TIMM_PREFIX + architecture, pretrained=checkpoint or tag or None)
    architecture, _, pretrained = text.partition(":")
    if not architecture:
        raise ModelSpecError(f"model name {name!r} has no architecture before ':'")
    return ModelSpec(name=text, architecture=architecture, pretrained=pretrained or None)


def _config_path(architecture: str) -> Path | None:
    bundled = bundled_config_dir() / f"{architecture}.json"
    if bundled.exists():
        return bundled
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / "model_configs" / f"{architecture}.json"
        if candidate.exists():
            return candidate
    return None


def known_open_clip_dimensions() -> dict[str, int]:
    """OpenCLIP's architectures and their output dimensions, as shipped with imgembed (read from
    OpenCLIP's configurations), so that the core knows them without OpenCLIP installed."""
    table = json.loads((files("imgembed.models") / "open_clip_dims.json").read_text(encoding="utf-8"))
    return {name: int(dim) for name, dim in table["embed_dim"].items()}


def embedding_dimension(spec: ModelSpec) -> int:
    """The output dimension of the spec's architecture, read from its config (no weights loaded):
    imgembed's own configurations, OpenCLIP's when it is installed, else the table shipped with
    imgembed."""
    if spec.is_timm:
        return _timm_dimension(spec)
    path = _config_path(spec.architecture)
    if path is not None:
        return int(json.loads(path.read_text())["embed_dim"])
    known = known_open_clip_dimensions()
    if spec.architecture in known:
        return known[spec.architecture]
    raise ModelSpecError(
        f"unknown OpenCLIP architecture {spec.architecture!r} (see open_clip.list_models(), or use imgembed-tiny; "
        "an architecture newer than this imgembed is known where OpenCLIP is installed: pip install 'imgembed[worker]')"
    )


def _timm_dimension(spec: ModelSpec) -> int:
    known = json.loads(TIMM_DIMS_FILE.read_text(encoding="utf-8"))["dim"]
    if spec.timm_architecture not in known:
        raise ModelSpecError(
            f"unknown timm architecture {spec.timm_architecture!r}: imgembed knows the output dimension of "
            f"{len(known)} of timm's ({', '.join(TIMM_FAMILIES)}); others after `python -m "
            "imgembed.worker.pytorch.timm_model` on a host with timm")
    return int(known[spec.timm_architecture])


_hashed: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256, for this process


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The file's SHA-256, read once per process while the file stays the same (inode, size and
    modification time): a worker loading a model checks its checkpoint and names its ONNX export by
    it, and ViT-L-14's checkpoint is 1.7 GB."""
    info = path.stat()
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _hashed:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
        _hashed[key] = digest.hexdigest()
    return _hashed[key]
