"""OpenCLIP's image transform, cut where the picture becomes a tensor.

The Pillow steps (resize, centre crop, mode) run per image in the decode threads and give a uint8
RGB array. Scaling to 0-1 and normalising follow with the transform's own float32 arithmetic
(divide by 255, subtract the mean, divide by the std), so the pixels are the same to the bit:

- for a GPU, once per forward pass, on the whole batch, on the device: the batch crosses to the
  GPU as bytes, a quarter of the floats;
- for a CPU, in the decode thread, with numpy: single-threaded, and the GIL is released. The
  transform's own dozen small tensor operations per image cost more than that: on 2 cores,
  decoding alone went from about 370 to 480 images/s at 224 px. A per-pass normalisation would
  sit on the model's own path, where a CPU has no time to spare.

A transform of any other shape is not cut: its images go through it whole, as before."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from imgembed.worker.onnx.pixels import normalise_array

if TYPE_CHECKING:
    import torch

TO_TENSOR_STEPS = ("ToTensor", "MaybeToTensor")

# What a decode thread hands the model: a uint8 (H, W, 3) RGB array (for a GPU, when the transform
# is cut), else a float (3, H, W) tensor (ONNX Runtime: a float32 (3, H, W) array).
ModelInput = Union[np.ndarray, "torch.Tensor"]


@dataclass(frozen=True)
class CutTransform:
    pillow_steps: tuple[Callable[[Image.Image], Any], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_open_clip(cls, preprocess: Any) -> CutTransform | None:
        """The cut of a Compose that ends in ToTensor then a three-channel Normalize, else None."""
        from torchvision import transforms

        steps = list(getattr(preprocess, "transforms", None) or [])
        if len(steps) < 2 or type(steps[-2]).__name__ not in TO_TENSOR_STEPS:
            return None
        normalize = steps[-1]
        if not isinstance(normalize, transforms.Normalize):
            return None
        mean, std = tuple(float(x) for x in normalize.mean), tuple(float(x) for x in normalize.std)
        if len(mean) != 3 or len(std) != 3:
            return None
        return cls(tuple(steps[:-2]), mean, std)

    def to_array(self, image: Image.Image) -> np.ndarray | None:
        """The Pillow steps' result as a uint8 (H, W, 3) array; None when they did not leave an RGB
        Pillow image (the caller then runs the whole transform)."""
        for step in self.pillow_steps:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            return None
        return np.asarray(image)

    def normalise_one(self, array: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, H, W), as ToTensor then Normalize, in numpy."""
        import torch

        return torch.from_numpy(normalise_array(array, self.mean, self.std))

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> float32 (N, 3, H, W), as ToTensor then Normalize."""
        import torch

        pixels = batch.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        return pixels.sub_(mean).div_(std)

