"""Building only the image tower of an OpenCLIP model, for workers that embed pictures.

OpenCLIP's own loader builds both towers and then copies a whole checkpoint into them, so loading
ViT-B-32 from a checkpoint held the model and the checkpoint in memory at once (2.0 GB of RSS,
measured). Here the model's frame is built on PyTorch's meta device (no memory, no random draws),
only the image tower is made real, and a checkpoint's image weights are read straight into it:
memory-mapped from a ``torch.save`` zip file (the weights then stay pages of that file, which the
kernel shares between workers), or only the tower's tensors from a ``.safetensors`` file.

``build_image_tower`` returns None where OpenCLIP's full loader is needed instead: CoCa models,
big_vision ``.npz`` checkpoints, and checkpoints whose keys are not OpenCLIP's ``visual.*``.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IMAGE_PREFIX = "visual."
# Everything of an OpenCLIP CLIP / CustomTextCLIP model that only text encoding uses.
TEXT_ONLY_PARTS = ("transformer", "token_embedding", "ln_final", "text_projection", "positional_embedding",
                   "text", "attn_mask", "logit_scale", "logit_bias")

Preprocess = Callable[[Image.Image], torch.Tensor]


class _DropOpenClipRandomInitWarning(logging.Filter):
    """The frame is built without weights on purpose; OpenCLIP would warn that it is random."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_frame_warning() -> Iterator[None]:
    root = logging.getLogger()  # OpenCLIP logs through the root logger itself
    drop = _DropOpenClipRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _checkpoint_file(architecture: str, pretrained: str) -> Path:
    """The file behind ``pretrained``: a path as given, or the (cached) download of a tag."""
    import open_clip

    tag_config = open_clip.get_pretrained_cfg(architecture, pretrained)
    if tag_config:
        return Path(open_clip.download_pretrained(tag_config))
    return Path(pretrained.removeprefix("file://")).expanduser()


def _strip(prefix: str, name: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def read_image_weights(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The image tower's tensors of a checkpoint, named as in the tower (``visual.`` removed), or
    None when the file holds no ``visual.*`` keys (a layout only OpenCLIP's converters read)."""
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt", device="cpu") as archive:
            names = [name for name in archive.keys() if _strip("module.", name).startswith(IMAGE_PREFIX)]
            state = {_strip("module.", name): archive.get_tensor(name) for name in names}
    else:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(checkpoint))
        if isinstance(loaded, dict) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            return None
        state = {_strip("module.", name): tensor for name, tensor in loaded.items()}
    image_state = {name[len(IMAGE_PREFIX):]: tensor for name, tensor in state.items()
                   if name.startswith(IMAGE_PREFIX)}
    return image_state or None


def _real_image_weights(frame: Any, config: dict[str, Any], architecture: str, pretrained: str | None,
                        seed: int) -> bool:
    """Give the frame a real image tower; False when the checkpoint needs OpenCLIP's loader."""
    import open_clip
    from open_clip.model import _build_vision_tower, resize_pos_embed

    if pretrained is None:
        # The same draws as OpenCLIP's CLIP(), which builds the image tower first from the seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
        tower.preprocess_cfg = frame.visual.preprocess_cfg
        frame.visual = tower
        return True
    checkpoint = _checkpoint_file(architecture, pretrained)
    if checkpoint.suffix in (".npz", ".npy"):
        return False
    weights = read_image_weights(checkpoint)
    if weights is None:
        return False
    prefixed = {IMAGE_PREFIX + name: tensor for name, tensor in weights.items()}
    resize_pos_embed(prefixed, frame)  # a checkpoint trained at another image size
    weights = {name[len(IMAGE_PREFIX):]: tensor for name, tensor in prefixed.items()}
    frame.visual.load_state_dict(weights, strict=True, assign=True)
    open_clip_dtype = torch.float32
    if any(tensor.is_floating_point() and tensor.dtype != open_clip_dtype for tensor in frame.visual.parameters()):
        frame.visual.to(open_clip_dtype)  # a half-precision checkpoint, computed in float32 as OpenCLIP does
    return True


def build_image_tower(architecture: str, pretrained: str | None, seed: int) -> tuple[Any, Preprocess] | None:
    """An OpenCLIP model holding only its image tower (its ``encode_image`` works, its text parts
    are None) and the model's evaluation transform; None where OpenCLIP's full loader is needed.
    With ``pretrained`` None the weights are the seeded random ones that the full loader gives."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = open_clip.get_model_config(architecture)
    if config is None or "multimodal_cfg" in config:
        return None
    with torch.device("meta"), _quiet_frame_warning():
        frame = open_clip.create_model(architecture, pretrained=pretrained, load_weights=False, device="meta")
    preprocess = image_transform_v2(PreprocessCfg(**frame.visual.preprocess_cfg), is_train=False)
    if not _real_image_weights(frame, config, architecture, pretrained, seed):
        return None
    for part in TEXT_ONLY_PARTS:
        if getattr(frame, part, None) is not None:
            setattr(frame, part, None)
    still_meta = [name for name, tensor in [*frame.named_parameters(), *frame.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"{architecture}: no weights were made for {', '.join(still_meta[:5])}")
    return frame, preprocess
