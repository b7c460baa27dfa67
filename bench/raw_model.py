"""(1): the model alone, on already-preprocessed tensors, and JPEG decoding alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from imgembed.bench.results import BenchSize
from imgembed.bench.timing import images_per_s
from imgembed.images.image_error import ImageError
from imgembed.models.names import parse_model_spec
from imgembed.settings import Settings
from imgembed.worker.engine import EmbeddingModel, use_onnx
from imgembed.worker.onnx.model import OnnxModel, load_onnx_model
from imgembed.worker.pipeline import preprocess_bytes
from imgembed.worker.process_state import forward_batch_size
from imgembed.worker.pytorch.embedding import load_model


class RawModel:
    """(1): the model alone in the bench process, timed on already-preprocessed tensors at the
    batch size a worker would pick. Kept loaded, so (2) can measure it again around each run: on a
    shared machine the CPU's speed drifts over minutes, and a ratio of two figures taken minutes
    apart would measure the drift."""

    def __init__(self, model_name: str, settings: Settings, size: BenchSize) -> None:
        spec = parse_model_spec(model_name)
        if use_onnx(settings):  # what the worker runs the model on (IMGEMBED_RUNTIME)
            self.model: EmbeddingModel = load_onnx_model(spec, "image", settings)
        else:
            self.model = load_model(spec, settings.device, tower="image", model_dir=settings.models_path)
        self.batch = forward_batch_size(self.model, "image", settings)
        on_gpu = self.model.device.type == "cuda"
        self.images = max(size.raw_images, 8 * self.batch if on_gpu else 0)
        self.seconds = size.raw_seconds_gpu if on_gpu else size.raw_seconds

    def throughput(self) -> float:
        """(1) once: images/s at the worker's batch size."""
        return self.images_per_s(self.images, self.batch, self.seconds)

    def images_per_s(self, images: int, batch_size: int, seconds: float = 0.0) -> float:
        """At least ``images`` images, and passes for at least ``seconds``."""
        size = self.model.input_size
        pixels: object = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
        if not isinstance(self.model, OnnxModel):
            pixels = torch.from_numpy(pixels)
        return images_per_s(self.model.embed_pixels, pixels, batch_size, images, seconds)

    def decode_images_per_s(self, photos: list[bytes], settings: Settings) -> float:
        """JPEG bytes to model-ready tensors alone, as the worker does it (Pillow in
        IMGEMBED_DECODE_THREADS threads): the other limit of (2), besides the model."""
        with ThreadPoolExecutor(settings.decode_threads) as decoders:
            list(decoders.map(lambda data: preprocess_bytes(data, self.model, settings), photos[:32]))  # warm-up
            started = time.perf_counter()
            prepared = list(decoders.map(lambda data: preprocess_bytes(data, self.model, settings), photos))
            seconds = time.perf_counter() - started
        failed = [result for result in prepared if isinstance(result, ImageError)]
        if failed:
            raise RuntimeError(f"{len(failed)} bench photos did not decode: {failed[0]}")
        return len(photos) / seconds
