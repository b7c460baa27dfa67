"""OpenCLIP's evaluation transform without PyTorch, for workers that run the image tower with ONNX
Runtime: resize (shortest side to the input size, or both sides), centre crop, RGB, then scale to
0-1 and normalise with the transform's own float32 arithmetic. The exporter checks, on pictures of
several shapes, that these steps give the transform's pixels exactly before it writes a model
(imgembed.worker.onnx.export); a transform of another shape is not exported."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class ImageSteps:
    size: int
    resize_mode: str  # "shortest": the short side to `size`, then a centre crop; "squash": both sides
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> ImageSteps:
        return cls(int(raw["size"]), str(raw["resize_mode"]), str(raw["interpolation"]),  # type: ignore[call-overload]
                   tuple(float(x) for x in raw["mean"]), tuple(float(x) for x in raw["std"]))  # type: ignore[arg-type, attr-defined]

    def resized(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.resize_mode == "squash":
            target = (self.size, self.size)
        elif width <= height:
            target = (self.size, int(self.size * height / width))
        else:
            target = (int(self.size * width / height), self.size)
        return image if target == (width, height) else image.resize(target, RESAMPLING[self.interpolation])

    def cropped(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """A decoded picture -> uint8 (size, size, 3) RGB."""
        return np.asarray(self.cropped(self.resized(image)).convert("RGB"))

    def __call__(self, image: Image.Image) -> np.ndarray:
        return normalise_array(self.to_array(image), self.mean, self.std)


def normalise_array(array: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W), as ToTensor then Normalize, in numpy."""
    pixels = np.empty((3, *array.shape[:2]), dtype=np.float32)
    np.divide(array.transpose(2, 0, 1), np.float32(255), out=pixels, dtype=np.float32)
    pixels -= np.array(mean, dtype=np.float32).reshape(3, 1, 1)
    pixels /= np.array(std, dtype=np.float32).reshape(3, 1, 1)
    return pixels
