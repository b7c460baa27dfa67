"""Loading OpenCLIP models and turning preprocessed pixels (or texts) into unit vectors."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from imgembed.models.names import RANDOM_INIT_SEED, ModelSpec, bundled_config_dir
from imgembed.worker.memory import return_freed_memory
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.device_decode import TensorPreprocess
from imgembed.worker.pytorch.pixels import CutTransform, ModelInput
from imgembed.worker.pytorch.towers import TEXT_ONLY_PARTS, build_image_tower, build_text_tower, drop_parts
from imgembed.worker.pytorch.weights import resolve_weights

log = logging.getLogger(__name__)

_config_lock = threading.Lock()
_bundled_configs_added = False


Tower = Literal["image", "text", "both"]


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
            open_clip.add_model_config(bundled_config_dir())
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
    cut: CutTransform | None = None  # the transform cut where the picture becomes a tensor
    tensor_preprocess: TensorPreprocess | None = None  # the transform on tensors (IMGEMBED_JPEG_DECODE=device)
    _pinned: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False)  # CUDA staging buffers

    def _autocast(self) -> Any:
        if self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def prepare(self, image: Image.Image) -> ModelInput:
        """A decoded picture as the model takes it (see imgembed.worker.pytorch.pixels): for a GPU a uint8 array
        when the transform is cut (its batch is normalised on the device), else a float tensor."""
        array = self.cut.to_array(image) if self.cut is not None else None
        if array is None:
            return self.preprocess(image)
        return array if self.device.type == "cuda" else self.cut.normalise_one(array)  # type: ignore[union-attr]

    def _pinned_buffer(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Page-locked memory for a batch bound for the GPU: its copy then runs asynchronously
        (non_blocking) at full speed. Reused: the previous batch's copy has finished, since
        embed_pixels waited for its results."""
        key = (dtype, shape[1:])
        buffer = self._pinned.get(key)
        if buffer is None or buffer.shape[0] < shape[0]:
            buffer = self._pinned[key] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buffer[: shape[0]]

    def _stack_arrays(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        shape = (len(arrays), *arrays[0].shape)
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays))
        buffer = self._pinned_buffer(torch.uint8, shape)
        np.stack(arrays, out=buffer.numpy())
        return buffer

    def _stack_tensors(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.stack(list(tensors))
        if any(tensor.device.type != "cpu" for tensor in tensors):  # decoded on the device
            return torch.stack([tensor.to(self.device, non_blocking=True) for tensor in tensors])
        return torch.stack(list(tensors), out=self._pinned_buffer(tensors[0].dtype, (len(tensors), *tensors[0].shape)))

    def stack_pixels(self, images: Sequence[ModelInput]) -> torch.Tensor:
        """Prepared pictures as one float (N, 3, H, W) batch, on the model's device (or, for CUDA,
        in pinned memory, ready for an asynchronous copy). The uint8 arrays among them cross to the
        device as bytes and are normalised there together."""
        arrays = [index for index, image in enumerate(images) if isinstance(image, np.ndarray)]
        if not arrays:
            return self._stack_tensors(images)  # type: ignore[arg-type]
        if self.cut is None:
            raise TypeError(f"model {self.spec.name} was given uint8 pictures, but its transform is not cut")
        raw = self._stack_arrays([images[index] for index in arrays])  # type: ignore[misc]
        normalised = self.cut.normalise(raw.to(self.device, non_blocking=True))
        if len(arrays) == len(images):
            return normalised
        # Mixed (device-decoded JPEGs beside Pillow's fallbacks): each picture back in its place.
        by_position = dict(zip(arrays, normalised))
        return self._stack_tensors([by_position.get(index, image) for index, image in enumerate(images)])

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ModelInput]) -> np.ndarray:
        """Prepared pictures (see ``prepare``) -> (N, dim) float32 unit vectors."""
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
    """Free the tower a worker does not need: text jobs never touch the image tower, and image jobs
    never touch the text tower (a third of ViT-B-32's weights, more for larger text towers)."""
    if tower == "image":
        drop_parts(model, TEXT_ONLY_PARTS)
    elif tower == "text":
        drop_parts(model, ("visual",))


def _build_model(spec: ModelSpec, pretrained: str | None, tower: Tower) -> tuple[Any, Any]:
    """The model and its evaluation transform. The tower asked for is built alone where it can be
    (see imgembed.worker.pytorch.towers); otherwise OpenCLIP builds the whole model, seeded on a forked RNG (the
    same random weights in every process, global state untouched), and load_model drops what the
    tower asked for does not use."""
    import open_clip

    built = None
    if tower == "image":
        built = build_image_tower(spec.architecture, pretrained, RANDOM_INIT_SEED)
    elif tower == "text":
        built = build_text_tower(spec.architecture, pretrained)
    if built is not None:
        return built
    if tower != "both":
        log.info("model %s: OpenCLIP's full loader builds both towers; the %s tower alone is kept", spec.name, tower)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(spec.architecture, pretrained=pretrained,
                                                                     device="cpu")
    return model, preprocess


def _probe(model: Any, tokenizer: Any, architecture: str) -> tuple[int, int]:
    """The model's embedding dimension and image input size (from its configuration when the model
    holds no image tower)."""
    import open_clip

    visual = model.visual
    if visual is not None:
        image_size = visual.image_size
    else:
        image_size = open_clip.get_model_config(architecture)["vision_cfg"]["image_size"]
    input_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    with torch.inference_mode():
        if visual is not None:
            features = model.encode_image(torch.zeros(1, 3, input_size, input_size))
        else:
            features = model.encode_text(tokenizer(["a"]))
    return int(features.shape[-1]), input_size


def _tag_preprocess(model: Any, preprocess: Any, architecture: str, tag: str | None) -> Any:
    """The evaluation transform of a pretrained tag's weights loaded from a file: the tag's own
    preprocessing (mean, std, interpolation, resize) over the architecture's, as OpenCLIP gives it
    when it downloads the tag itself."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    visual = getattr(model, "visual", None)
    tag_config = open_clip.get_pretrained_cfg(architecture, tag) if tag else None
    if visual is None or not tag_config or not hasattr(visual, "preprocess_cfg"):
        return preprocess
    merged = merge_preprocess_dict(visual.preprocess_cfg, tag_config)
    visual.preprocess_cfg = merged
    return image_transform_v2(PreprocessCfg(**merged), is_train=False)


def load_model(spec: ModelSpec, device_setting: str = "auto", tower: Tower = "both",
               model_dir: Path | None = None) -> LoadedModel:
    """Build the model from OpenCLIP's configuration (a local checkpoint, the model directory, a
    tag's download, or seeded random weights), keep the tower(s) asked for, and put it in eval mode
    on the chosen device."""
    import open_clip

    _add_bundled_configs()
    device = resolve_device(device_setting)
    if spec.architecture not in open_clip.list_models():
        raise ModelLoadError(f"model {spec.name}: unknown OpenCLIP architecture {spec.architecture!r}")
    weights = resolve_weights(spec, model_dir or Path(os.devnull))
    try:
        model, preprocess = _build_model(spec, weights.file, tower)
        preprocess = _tag_preprocess(model, preprocess, spec.architecture, weights.tag)
    except Exception as error:  # noqa: BLE001 - OpenCLIP raises many kinds; all mean "cannot load"
        raise ModelLoadError(f"model {spec.name} could not be loaded: {type(error).__name__}: {error}") from error
    tokenizer = open_clip.get_tokenizer(spec.architecture)
    dim, input_size = _probe(model, tokenizer, spec.architecture)
    _keep_tower(model, tower)
    gc.collect()
    return_freed_memory()
    try:
        model.eval().to(device)
    except torch.OutOfMemoryError as error:
        raise ModelLoadError(f"model {spec.name}: no room for it on {device}: {error}") from error
    log.info("loaded model %s (%s tower%s) on %s (dim %s, input %spx)", spec.name, tower,
             "s" if tower == "both" else "", device, dim, input_size)
    return LoadedModel(spec, model, preprocess, tokenizer, device, dim, input_size,
                       CutTransform.from_open_clip(preprocess), TensorPreprocess.from_open_clip(preprocess))
