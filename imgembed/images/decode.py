"""Decoding image bytes safely into an upright RGB picture. Every problem becomes an
:class:`ImageError` naming it, so that the image fails alone."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from imgembed.images.image_error import ImageError, Reason, plain_words
from imgembed.settings import Settings


def use_pixel_cap(max_pixels: int) -> None:
    """Set Pillow's own decompression-bomb limit, which is process-wide, to the cap: call once where
    a process that decodes starts (a worker). Pillow refuses images above twice its limit before
    :func:`decode_image` sees their size, so without this a cap above twice Pillow's default
    (about 179 million pixels) would not be honoured; below it, decode_image refuses by itself."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB on a white background: transparent areas look like paper, not like black."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.convert("I")
        extrema = image.getextrema()  # one band: (low, high)
        low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
        scale = 255.0 / max(1, high - low)
        image = image.point(lambda value: (value - low) * scale).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, settings: Settings, target_size: int | None = None) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied. ``target_size`` lets JPEGs decode at a
    reduced scale (never below the model's input size)."""
    if not data:
        raise ImageError(Reason.NOT_AN_IMAGE, "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header: the size is known, nothing decoded
        width, height = image.size
        if width * height > settings.max_image_pixels:
            raise ImageError(
                Reason.DECOMPRESSION_BOMB,
                f"image is {width}x{height} = {width * height} pixels, over the cap of "
                f"{settings.max_image_pixels} (IMGEMBED_MAX_PIXELS): possible decompression bomb"
            )
        if target_size and image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(Reason.DECOMPRESSION_BOMB, f"refused by Pillow: {plain_words(error)}") from None
    except UnidentifiedImageError:
        raise ImageError(Reason.NOT_AN_IMAGE, f"not a recognised image format ({_sniff(data)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageError(Reason.CORRUPT_IMAGE, f"{type(error).__name__}: {plain_words(error)}") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    except Exception:  # noqa: BLE001 - broken EXIF must not lose a decodable image
        pass
    try:
        return _flatten_alpha(image)
    except (OSError, ValueError) as error:
        raise ImageError(Reason.CORRUPT_IMAGE, f"cannot convert {image.mode} image to RGB: {plain_words(error)}") from None


def _sniff(data: bytes) -> str:
    """What the bytes look like, in words: never the bytes themselves (an error is readable by
    more roles than the file it came from)."""
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "looks like SVG/XML, which is not supported"
    sample = data[:512]
    if sample and sum(32 <= byte < 127 or byte in b"\t\r\n" for byte in sample) > 0.95 * len(sample):
        return f"looks like text, {len(data)} bytes"
    return f"unknown binary data, {len(data)} bytes"
