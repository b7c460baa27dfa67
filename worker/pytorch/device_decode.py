"""Decoding JPEGs on the model's device (nvJPEG through torchvision on CUDA) and preprocessing
them there as tensors, instead of Pillow on the CPU (IMGEMBED_JPEG_DECODE=device).

Only plain RGB or greyscale JPEGs within the caps take this path; anything else, and any JPEG the
device decoder refuses, goes through Pillow (imgembed.images.decode) image by image, so an odd file still
fails alone with Pillow's reason. The tensor preprocessing mirrors OpenCLIP's evaluation
transform (shortest side resized bicubically, centre crop, normalised); the vectors differ from
Pillow's path about as much as two JPEG decoders do."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from imgembed.settings import Settings
from imgembed.worker.pytorch.pixels import CutTransform

EXIF_ORIENTATION = 0x0112
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class TensorPreprocess:
    """OpenCLIP's evaluation transform, on uint8 (3, H, W) tensors on any device."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_open_clip(cls, preprocess: Any) -> TensorPreprocess | None:
        """Read the transform's settings; None unless it is the plain resize, crop, normalise."""
        from torchvision import transforms

        cut = CutTransform.from_open_clip(preprocess)  # the normalisation, read where Pillow's path reads it
        if cut is None:
            return None
        resize = next((step for step in cut.pillow_steps if isinstance(step, transforms.Resize)), None)
        crop = next((step for step in cut.pillow_steps if isinstance(step, transforms.CenterCrop)), None)
        if resize is None or crop is None:
            return None
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        if size is None or resize.interpolation != transforms.InterpolationMode.BICUBIC or tuple(crop.size) != (size, size):
            return None
        return cls(size, cut.mean, cut.std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        resized = functional.resize(image, [self.size], interpolation=functional.InterpolationMode.BICUBIC, antialias=True)
        cropped = functional.center_crop(resized, [self.size, self.size]).float().div_(255).clamp_(0, 1)
        mean = torch.tensor(self.mean, device=image.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(3, 1, 1)
        return cropped.sub_(mean).div_(std)


def jpeg_orientation(data: bytes, settings: Settings) -> int | None:
    """The EXIF orientation (1 when none) of a JPEG the device may decode, or None when it should
    go through Pillow instead (not a JPEG, CMYK, over the pixel cap, unreadable header)."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or width * height > settings.max_image_pixels:
                return None
            try:
                return int(image.getexif().get(EXIF_ORIENTATION, 1))
            except Exception:  # noqa: BLE001 - broken EXIF: decode as stored, as Pillow's path does
                return 1
    except Exception:  # noqa: BLE001 - Pillow will say what is wrong
        return None


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation 2-8 on a (C, H, W) tensor, as Pillow's ImageOps.exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)  # mirrored left-right
    if orientation == 3:
        return image.flip(-1).flip(-2)  # upside down
    if orientation == 4:
        return image.flip(-2)  # mirrored top-bottom
    if orientation == 5:
        return image.transpose(-2, -1)  # across the main diagonal
    if orientation == 6:
        return torch.rot90(image, k=-1, dims=(-2, -1))  # a quarter turn clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-1).flip(-2)  # across the other diagonal
    if orientation == 8:
        return torch.rot90(image, k=1, dims=(-2, -1))  # a quarter turn anticlockwise
    return image


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) RGB tensors on ``device``, or None for each JPEG the decoder refused."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
        try:  # one call for the whole batch is what makes nvJPEG fast
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for one in encoded:  # one bad file fails the batch call: find it
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded
