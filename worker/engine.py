"""What runs a model's forward passes in a worker: PyTorch (imgembed.worker.pytorch.embedding) or ONNX
Runtime (imgembed.worker.onnx.model), chosen by IMGEMBED_RUNTIME, and the face both show the rest
of the worker. This module loads neither."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from imgembed.settings import Settings

Tower = Literal["image", "text", "both"]


class EmbeddingModel(Protocol):
    """A loaded model (or one tower of it), whichever library runs it."""

    spec: Any
    dim: int
    input_size: int
    device: Any  # .type: "cpu" or "cuda"; str(): how the worker's heartbeat names it
    cut: Any
    tensor_preprocess: Any

    def prepare(self, image: Image.Image) -> Any: ...

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def embed_pixels(self, pixels: Any) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _nvidia_gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU, learnt without loading PyTorch."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def use_onnx(settings: Settings) -> bool:
    """IMGEMBED_RUNTIME=onnx, or auto on a CPU (IMGEMBED_DEVICE cpu, or auto without a GPU) where
    onnxruntime is installed. PyTorch stays the runtime for CUDA."""
    if settings.runtime != "auto":
        return settings.runtime == "onnx"
    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not _nvidia_gpu_present())
    return on_cpu and importlib.util.find_spec("onnxruntime") is not None
