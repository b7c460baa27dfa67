"""One tower of a model run by ONNX Runtime on the CPU, with the same face as the PyTorch model
(imgembed.worker.pytorch.embedding.LoadedModel) where the worker uses it: ``prepare`` a decoded picture,
``embed_images``, ``embed_pixels``, ``embed_texts``. Nothing here loads PyTorch."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgembed.models.names import ModelSpec
from imgembed.settings import Settings
from imgembed.worker.onnx.cache import exported_tower
from imgembed.worker.onnx.clip_tokenizer import MERGES_FILE, ClipTokenizer
from imgembed.worker.onnx.int8_weights import int8_weight_bits
from imgembed.worker.onnx.pixels import ImageSteps

log = logging.getLogger(__name__)

# The least cosine to PyTorch's vectors that int8 weights keep on the export's samples without a
# warning. ViT-B-32's image tower keeps 0.9998; imgembed-tiny's and imgembed-shapes' towers keep
# 0.998 or more.
INT8_AGREEMENT_WARNING = 0.995


@dataclass(frozen=True)
class OnnxDevice:
    """Where an ONNX model runs, as the worker reports it."""

    type: str = "cpu"

    def __str__(self) -> str:
        return f"{self.type} (onnxruntime)"


@dataclass
class OnnxModel:
    spec: ModelSpec
    tower: str
    session: Any  # onnxruntime.InferenceSession
    dim: int
    input_size: int
    image_steps: ImageSteps | None = None
    tokenizer: ClipTokenizer | None = None
    int8_bits: int | None = None  # the weights' bits when quantised (imgembed.worker.onnx.int8_weights), else None
    device: OnnxDevice = field(default_factory=OnnxDevice)
    cut: None = None  # the PyTorch model's transform cut, for GPUs: none here
    tensor_preprocess: None = None  # decoding on a GPU: not on this path

    @property
    def runtime(self) -> str:
        """What runs it, as logs and benchmarks say: ONNX Runtime, and the int8 weights if any."""
        return "ONNX Runtime" if self.int8_bits is None else f"ONNX Runtime, int8 ({self.int8_bits}-bit weights)"

    def prepare(self, image: Image.Image) -> np.ndarray:
        """A decoded picture -> float32 (3, H, W) pixels, as the model takes them."""
        if self.image_steps is None:
            raise TypeError(f"model {self.spec.name}: the {self.tower} tower takes no pictures")
        return self.image_steps(image)

    def _run(self, feed: np.ndarray) -> np.ndarray:
        output = self.session.run(None, {self.session.get_inputs()[0].name: feed})[0].astype(np.float32, copy=False)
        return output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 pixels -> (N, dim) float32 unit vectors."""
        return self._run(np.ascontiguousarray(pixels, dtype=np.float32))

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Prepared pictures (see ``prepare``) -> (N, dim) float32 unit vectors."""
        return self.embed_pixels(np.stack(list(images)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise TypeError(f"model {self.spec.name}: the {self.tower} tower takes no texts")
        return self._run(self.tokenizer(list(texts)))


def _session(path: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: the decode threads share the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx_model(spec: ModelSpec, tower: str, settings: Settings, int8_bits: int | None = None) -> OnnxModel:
    """The tower exported to ONNX (exported first if this is the first time; see
    imgembed.worker.onnx.cache) in an ONNX Runtime session on the CPU. With
    IMGEMBED_ONNX_QUANTIZE=int8, the int8 weights this CPU suits, or those of ``int8_bits``."""
    folder, manifest = exported_tower(spec, tower, settings.models_path, settings.onnx_quantize)
    bits = (int8_bits or int8_weight_bits()) if settings.onnx_quantize == "int8" else None
    file = manifest["file"] if bits is None else manifest["int8"][str(bits)]["file"]
    model = OnnxModel(spec, tower, _session(folder / file), int(manifest["dim"]), int(manifest["input_size"]),
                      int8_bits=bits)
    if tower == "image":
        model.image_steps = ImageSteps.from_dict(manifest["image_steps"])
    else:
        model.tokenizer = ClipTokenizer(folder / MERGES_FILE, int(manifest["context_length"]))
    log.info("loaded model %s (%s tower) on %s (dim %s, input %spx)", spec.name, tower, model.runtime, model.dim,
             model.input_size)
    if bits is not None and manifest["int8"][str(bits)]["agreement"] < INT8_AGREEMENT_WARNING:
        log.warning("model %s (%s tower): its int8 weights agree with PyTorch's only to cosine %.4f on the export's "
                    "samples, so neighbours may change; IMGEMBED_ONNX_QUANTIZE=none runs it in float32", spec.name,
                    tower, manifest["int8"][str(bits)]["agreement"])
    return model
