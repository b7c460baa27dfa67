"""Loading OpenCLIP models and turning preprocessed pixels (or texts) into unit vectors."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from worker.memory import return_freed_memory
from worker.model_spec import BUNDLED_CONFIG_DIR, RANDOM_INIT_SEED, ModelSpec

log = logging.getLogger(__name__)

_config_lock = threading.Lock()
_bundled_configs_added = False


Tower = Literal["image", "text", "both"]
TEXT_TOWER_PARTS = ("transformer", "token_embedding", "ln_final", "text_projection", "positional_embedding")


class ModelLoadError(RuntimeError):
    """The model named by a job cannot be loaded here (missing weights, unknown architecture...)."""


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"IMGEMBED_DEVICE={setting} but CUDA is not available on this machine")
    return torch.device(setting)


def _add_bundled_configs() -> None:
    global _bundled_configs_added
    import open_clip

    with _config_lock:
        if not _bundled_configs_added:
            open_clip.add_model_config(BUNDLED_CONFIG_DIR)
            _bundled_configs_added = True


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any  # open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    dim: int
    input_size: int

    def _autocast(self) -> Any:
        if self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    _pinned: torch.Tensor | None = field(default=None, repr=False, compare=False)  # CUDA staging buffer

    def stack_pixels(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images as one (N, 3, H, W) batch. For CUDA it is built in page-locked
        memory, so the copy to the GPU runs asynchronously (non_blocking) at full speed."""
        if self.device.type != "cuda":
            return torch.stack(list(images))
        if any(image.device != torch.device("cpu") for image in images):  # decoded on the device
            return torch.stack([image.to(self.device, non_blocking=True) for image in images])
        shape = (len(images), *images[0].shape)
        if self._pinned is None or self._pinned.shape[0] < shape[0] or self._pinned.shape[1:] != shape[1:]:
            self._pinned = torch.empty(shape, dtype=images[0].dtype, pin_memory=True)
        # The previous batch's copy has finished: embed_pixels waited for its results.
        return torch.stack(list(images), out=self._pinned[: shape[0]])

    @torch.inference_mode()
    def embed_images(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Preprocessed (3, H, W) images -> (N, dim) float32 unit vectors."""
        return self.embed_pixels(self.stack_pixels(images))

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) preprocessed pixels -> (N, dim) float32 unit vectors."""
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_image(pixels)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy()


def _keep_tower(model: Any, tower: Tower) -> None:
    """Free the tower a worker does not need: image jobs never touch the text tower, and text jobs
    never touch the image tower (a third of ViT-B-32's weights, more for larger text towers)."""
    if tower == "image":
        for part in TEXT_TOWER_PARTS:
            if getattr(model, part, None) is not None:
                setattr(model, part, None)
    elif tower == "text":
        model.visual = None


def load_model(spec: ModelSpec, device_setting: str = "auto", tower: Tower = "both") -> LoadedModel:
    """Build the model through OpenCLIP's own loader (tag download, local checkpoint, or seeded
    random weights), keep the tower(s) asked for, and put it in eval mode on the chosen device."""
    import open_clip

    _add_bundled_configs()
    device = resolve_device(device_setting)
    checkpoint = spec.checkpoint_path
    if checkpoint is not None and not checkpoint.is_file():
        raise ModelLoadError(f"model {spec.name}: checkpoint file {checkpoint} does not exist")
    if spec.architecture not in open_clip.list_models():
        raise ModelLoadError(f"model {spec.name}: unknown OpenCLIP architecture {spec.architecture!r}")
    pretrained = str(checkpoint) if checkpoint is not None else spec.pretrained
    try:
        # Seeded on a forked RNG: the same random weights in every process, global state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.architecture, pretrained=pretrained, device="cpu"
            )
    except Exception as error:  # noqa: BLE001 - OpenCLIP raises many kinds; all mean "cannot load"
        raise ModelLoadError(f"model {spec.name} could not be loaded: {type(error).__name__}: {error}") from error
    tokenizer = open_clip.get_tokenizer(spec.architecture)
    image_size = model.visual.image_size
    input_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    with torch.inference_mode():
        dim = int(model.encode_image(torch.zeros(1, 3, input_size, input_size)).shape[-1])
    _keep_tower(model, tower)
    gc.collect()
    return_freed_memory()
    model.eval().to(device)
    log.info("loaded model %s (%s tower%s) on %s (dim %s, input %spx)", spec.name, tower,
             "s" if tower == "both" else "", device, dim, input_size)
    return LoadedModel(spec, model, preprocess, tokenizer, device, dim, input_size)
