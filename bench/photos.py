"""The JPEGs that (2) and (3) insert: a folder of real photos (``--photos``), or photo-sized
pictures generated here, so that the benchmark runs on a machine with nothing beside it.

A generated picture is 500x375 pixels (the size of most ImageNet photos), smooth colour fields,
shapes and fine noise, saved at JPEG quality 90: about as costly to decode as a photo of that size.
Figures from real photos and from generated ones are not interchangeable; RESULTS.md says which."""

from __future__ import annotations

import random
from pathlib import Path

GENERATED_COUNT = 60
WIDTH, HEIGHT = 500, 375


def photo_files(folder: Path) -> list[Path]:
    """The folder's ``*.JPEG`` files, in name order."""
    return sorted(folder.glob("*.JPEG"))


def _picture(rng: random.Random) -> object:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    top = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    rows = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    field = np.broadcast_to(top + (bottom - top) * rows, (HEIGHT, WIDTH, 3))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (HEIGHT, WIDTH, 3))
    picture = Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.randint(4, 12)):
        x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
        extent = rng.randint(20, 160)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + extent, y + extent * rng.uniform(0.5, 1.5)), fill=colour)
    return picture.filter(ImageFilter.GaussianBlur(0.6))


def generated_photos(folder: Path, count: int = GENERATED_COUNT, seed: int = 0) -> list[Path]:
    """Write ``count`` photo-sized JPEGs into ``folder`` (kept: made once) and return them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for number in range(count):
        path = folder / f"generated-{number:03d}.JPEG"
        picture = _picture(rng)
        if not path.exists():
            picture.save(path, format="JPEG", quality=90)  # type: ignore[attr-defined]
        paths.append(path)
    return paths


def tagged_copy(jpeg: bytes, tag: str) -> bytes:
    """The same picture as other bytes: a JPEG comment segment holding ``tag`` right after the
    start-of-image marker. Workers embed identical bytes once, so a run that means to embed every
    row gives each row bytes of its own; decoding costs the same."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    comment = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def tagged_files(sources: list[bytes], tags: list[str], folder: Path) -> list[Path]:
    """``tagged_copy`` of ``sources[i % len(sources)]`` for each tag, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, tag in enumerate(tags):
        path = folder / f"{tag}.JPEG"
        path.write_bytes(tagged_copy(sources[number % len(sources)], tag))
        paths.append(path)
    return paths
