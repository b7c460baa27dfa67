"""2-D maps of an embedding space: a projection (scikit-learn's PCA or t-SNE, or umap-learn when
installed) and a PNG with thumbnails framed in their label's colour."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

METHODS = ("pca", "tsne", "umap")


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) vectors -> (N, 2) coordinates."""
    if len(vectors) < 3:
        raise ValueError(f"a map needs at least 3 vectors, got {len(vectors)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(vectors)
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ValueError("--method umap needs umap-learn (pip install umap-learn); try tsne or pca") from error
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(vectors)
    raise ValueError(f"unknown projection {method!r}; use one of {', '.join(METHODS)}")


def label_colours(labels: Sequence[str | None]) -> dict[str | None, tuple[int, int, int]]:
    distinct = sorted({label for label in labels if label is not None})
    colours: dict[str | None, tuple[int, int, int]] = {None: (150, 150, 150)}
    for index, label in enumerate(distinct):
        red, green, blue = colorsys.hsv_to_rgb(index / max(1, len(distinct)), 0.75, 0.85)
        colours[label] = (int(red * 255), int(green * 255), int(blue * 255))
    return colours


def draw_map(
    coordinates: np.ndarray,
    thumbnails: Sequence[Image.Image | None],
    labels: Sequence[str | None],
    out: Path,
    *,
    size: int = 1400,
    thumb: int = 40,
    title: str = "",
    max_legend: int = 30,
) -> Path:
    """Write a PNG: each point a thumbnail (or a dot) framed in its label's colour, and a legend."""
    legend_width = 260
    canvas = Image.new("RGB", (size + legend_width, size), "white")
    draw = ImageDraw.Draw(canvas)
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    margin = thumb
    positions = margin + (coordinates - low) / span * (size - 2 * margin)
    colours = label_colours(labels)
    for (x, y), image, label in zip(positions, thumbnails, labels):
        colour = colours[label]
        left, top = int(x - thumb / 2), int(y - thumb / 2)
        if image is None:
            draw.ellipse((left + thumb / 3, top + thumb / 3, left + 2 * thumb / 3, top + 2 * thumb / 3), fill=colour)
            continue
        small = image.copy()
        small.thumbnail((thumb - 4, thumb - 4))
        draw.rectangle((left, top, left + thumb - 1, top + thumb - 1), outline=colour, width=3)
        canvas.paste(small, (left + 2, top + 2))
    if title:
        draw.text((10, 10), title, fill="black")
    y = 20
    for label, colour in list(colours.items())[: max_legend + 1]:
        if label is None and None not in labels:
            continue
        draw.rectangle((size + 10, y, size + 24, y + 14), fill=colour)
        draw.text((size + 32, y + 1), "(unlabelled)" if label is None else label[:32], fill="black")
        y += 20
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
