"""Building one tower of an OpenCLIP model: the image tower for picture jobs, the text tower for
text queries.

OpenCLIP's own loader builds both towers and then copies a whole checkpoint into them, so loading
ViT-B-32 from a checkpoint held the model and the checkpoint in memory at once (2.0 GB of RSS,
measured). Here the model's frame is built on PyTorch's meta device (no memory, no random draws),
only the tower asked for is made real, and a checkpoint's weights for it go straight into it:
memory-mapped from a ``torch.save`` zip file (the weights then stay pages of that file, which the
kernel shares between workers), or only the tower's tensors from a ``.safetensors`` file.

The builders return None where OpenCLIP's full loader is needed instead: CoCa models, big_vision
``.npz`` checkpoints, checkpoints laid out otherwise than OpenCLIP saves them, Hugging Face text
towers, and a text tower with seeded random weights (OpenCLIP draws those after the image
tower's, so only a full build gives the same ones).
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
SCORE_PARTS = ("logit_scale", "logit_bias")  # training's similarity scale: neither tower uses it
# The text tower's parts as a CLIP model holds them, named as in OpenCLIP's TextTransformer;
# a CustomTextCLIP model holds its text tower whole, as ``text``.
CLIP_TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                   "attn_mask")
TEXT_ONLY_PARTS = (*CLIP_TEXT_PARTS, "text", *SCORE_PARTS)

Preprocess = Callable[[Image.Image], torch.Tensor]
log = logging.getLogger(__name__)


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


def _frame(architecture: str, pretrained: str | None) -> tuple[Any, Preprocess]:
    """The whole model on the meta device, and its evaluation transform (the tag's, if any)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    with torch.device("meta"), _quiet_frame_warning():
        frame = open_clip.create_model(architecture, pretrained=pretrained, load_weights=False, device="meta")
    return frame, image_transform_v2(PreprocessCfg(**frame.visual.preprocess_cfg), is_train=False)


def _checkpoint_file(architecture: str, pretrained: str) -> Path | None:
    """The file behind ``pretrained`` (a path as given, or the cached download of a tag), or None
    for big_vision ``.npz`` files, which only OpenCLIP's converter reads."""
    import open_clip

    tag_config = open_clip.get_pretrained_cfg(architecture, pretrained)
    if tag_config:
        path = Path(open_clip.download_pretrained(tag_config))
    else:
        path = Path(pretrained.removeprefix("file://")).expanduser()
    return None if path.suffix in (".npz", ".npy") else path


def _strip(prefix: str, name: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def read_weights(checkpoint: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names (``module.`` removed) ``wanted`` accepts, and no
    others: memory-mapped from a zip file, read alone from a ``.safetensors`` file. Empty when the
    file holds no such names or is no state dict at all."""
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt", device="cpu") as archive:
            stored = {_strip("module.", name): name for name in archive.keys()}
            return {name: archive.get_tensor(stored_name) for name, stored_name in stored.items() if wanted(name)}
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(checkpoint))
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        return {}
    state = {_strip("module.", name): tensor for name, tensor in loaded.items()}
    return {name: tensor for name, tensor in state.items() if wanted(name)}


def _checkpoint_weights(architecture: str, pretrained: str, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors ``wanted`` accepts from the file behind ``pretrained``; empty where only
    OpenCLIP's loader reads that file (big_vision ``.npz``) or it holds no such names."""
    checkpoint = _checkpoint_file(architecture, pretrained)
    return read_weights(checkpoint, wanted) if checkpoint is not None else {}


def _is_image_weight(name: str) -> bool:
    return name.startswith(IMAGE_PREFIX)


def _is_text_weight(name: str) -> bool:
    return not name.startswith(IMAGE_PREFIX) and name not in SCORE_PARTS


def _in_float32(module: torch.nn.Module) -> None:
    """A half-precision checkpoint is computed in float32, as OpenCLIP's loader does."""
    if any(tensor.is_floating_point() and tensor.dtype != torch.float32 for tensor in module.parameters()):
        module.to(torch.float32)


def drop_parts(frame: Any, parts: tuple[str, ...]) -> None:
    """Set each of the model's ``parts`` it has to None: its memory goes with it."""
    for part in parts:
        if getattr(frame, part, None) is not None:
            setattr(frame, part, None)


def _all_real(frame: Any, architecture: str) -> bool:
    """Whether every tensor the model kept was made. A tower with buffers that are not saved in
    checkpoints (some timm towers compute their position indices) is left to OpenCLIP's loader."""
    still_meta = [name for name, tensor in [*frame.named_parameters(), *frame.named_buffers()] if tensor.is_meta]
    if still_meta:
        log.info("%s: %s not in the checkpoint; OpenCLIP's loader builds this model", architecture,
                 ", ".join(still_meta[:5]))
    return not still_meta


def build_image_tower(architecture: str, pretrained: str | None, seed: int) -> tuple[Any, Preprocess] | None:
    """An OpenCLIP model holding only its image tower (its ``encode_image`` works, its text parts
    are None) and the model's evaluation transform; None where OpenCLIP's full loader is needed.
    With ``pretrained`` None the weights are the seeded random ones that the full loader gives."""
    import open_clip
    from open_clip.model import _build_vision_tower, resize_pos_embed

    config = open_clip.get_model_config(architecture)
    if config is None or "multimodal_cfg" in config:
        return None
    frame, preprocess = _frame(architecture, pretrained)
    if pretrained is None:
        # The same draws as OpenCLIP's CLIP(), which builds the image tower first from the seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
        tower.preprocess_cfg = frame.visual.preprocess_cfg
        frame.visual = tower
    else:
        weights = _checkpoint_weights(architecture, pretrained, _is_image_weight)
        if not weights:
            return None
        resize_pos_embed(weights, frame)  # a checkpoint trained at another image size
        frame.visual.load_state_dict({_strip(IMAGE_PREFIX, name): tensor for name, tensor in weights.items()},
                                     strict=True, assign=True)
        _in_float32(frame.visual)
    drop_parts(frame, TEXT_ONLY_PARTS)
    return (frame, preprocess) if _all_real(frame, architecture) else None


def build_text_tower(architecture: str, pretrained: str | None) -> tuple[Any, Preprocess] | None:
    """An OpenCLIP model holding only its text tower (``encode_text`` works, ``visual`` is None)
    with a checkpoint's weights, and the model's evaluation transform; None where OpenCLIP's full
    loader is needed (seeded random weights among them)."""
    import open_clip
    from open_clip.model import CustomTextCLIP, _build_text_tower

    config = open_clip.get_model_config(architecture)
    if (pretrained is None or config is None or "multimodal_cfg" in config
            or "hf_model_name" in config.get("text_cfg", {})):
        return None
    weights = _checkpoint_weights(architecture, pretrained, _is_text_weight)
    if not weights:
        return None
    frame, preprocess = _frame(architecture, pretrained)
    # Built for real so that its buffers (the causal attention mask) are right; its random
    # weights are replaced by the checkpoint's below, and freed.
    tower = _build_text_tower(config["embed_dim"], config["text_cfg"], config.get("quick_gelu", False))
    if isinstance(frame, CustomTextCLIP):
        frame.text = tower
    else:
        for part in CLIP_TEXT_PARTS:
            setattr(frame, part, getattr(tower, part))
    drop_parts(frame, ("visual", *SCORE_PARTS))
    expected = frame.state_dict()
    if set(weights) != set(expected) or any(weights[name].shape != expected[name].shape for name in expected):
        return None  # an older layout or another context length: OpenCLIP's loader converts those
    frame.load_state_dict(weights, strict=True, assign=True)
    _in_float32(frame)
    return (frame, preprocess) if _all_real(frame, architecture) else None
