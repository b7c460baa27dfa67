"""Generated images of coloured shapes, with their labels and captions: test and demo data that
needs no download."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")


@dataclass(frozen=True)
class ShapeImage:
    shape: str
    colour: str
    size: str
    image: Image.Image

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def caption_variant(self, rng: random.Random) -> str:
        """One of several phrasings, so a model learns colour and shape words, not one sentence."""
        return rng.choice([
            f"a {self.size} {self.colour} {self.shape}",
            f"a {self.colour} {self.shape}",
            f"{self.colour} {self.shape}",
            f"a {self.shape} that is {self.colour}",
            f"a photo of a {self.colour} {self.shape}",
        ])

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def draw_shape(shape: str, colour: str, size: str, rng: random.Random, canvas: int = 96) -> ShapeImage:
    """One shape on a light, slightly tinted background, with a little noise clutter."""
    grey = rng.randint(190, 255)
    tint = tuple(max(0, min(255, grey + rng.randint(-30, 30))) for _ in range(3))
    image = Image.new("RGB", (canvas, canvas), tint)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 3)):  # faint grey specks: backgrounds are never perfectly flat
        x, y = rng.randint(0, canvas - 4), rng.randint(0, canvas - 4)
        speck = rng.randint(140, 200)
        draw.rectangle((x, y, x + rng.randint(1, 4), y + rng.randint(1, 4)), fill=(speck, speck, speck))
    extent = rng.randint(18, 28) if size == "small" else rng.randint(44, 64)
    left = rng.randint(2, canvas - extent - 2)
    top = rng.randint(2, canvas - extent - 2)
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return ShapeImage(shape, colour, size, image)


def random_shapes(count: int, seed: int = 0) -> list[ShapeImage]:
    rng = random.Random(seed)
    return [draw_shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), rng) for _ in range(count)]
