"""Pictures of a 2-D map: a PNG with thumbnails framed in their label's colour, and a self-contained
HTML page where hovering a point shows its image and key."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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


def write_html(
    coordinates: np.ndarray,
    keys: Sequence[str],
    thumbnails: Sequence[Image.Image | None],
    labels: Sequence[str | None],
    out: Path,
    *,
    title: str,
    size: int = 900,
) -> Path:
    """A self-contained page: one dot per row, coloured by label; hovering shows the image and key."""
    import base64
    import html
    import io

    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    positions = 10 + (coordinates - low) / span * (size - 20)
    colours = label_colours(labels)
    points = []
    for (x, y), key, image, label in zip(positions, keys, thumbnails, labels):
        source = ""
        if image is not None:
            small = image.copy()
            small.thumbnail((96, 96))
            buffer = io.BytesIO()
            small.convert("RGB").save(buffer, format="JPEG", quality=80)
            source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        red, green, blue = colours[label]
        points.append(
            f'<div class="p" style="left:{x:.1f}px;top:{y:.1f}px;background:rgb({red},{green},{blue})" '
            f'data-key="{html.escape(str(key))}" data-label="{html.escape(label or "")}" data-img="{source}"></div>'
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
#map {{ position: relative; width: {size}px; height: {size}px; border: 1px solid #ccc; }}
.p {{ position: absolute; width: 8px; height: 8px; margin: -4px; border-radius: 50%; cursor: pointer; }}
#tip {{ position: fixed; display: none; background: white; border: 1px solid #888; padding: 4px; font-size: 12px; }}
</style></head>
<body><h3>{html.escape(title)}</h3><div id="map">{"".join(points)}</div><div id="tip"></div>
<script>
const tip = document.getElementById("tip");
document.querySelectorAll(".p").forEach(point => {{
  point.addEventListener("mouseenter", event => {{
    tip.textContent = "";
    if (point.dataset.img) {{ const img = document.createElement("img"); img.src = point.dataset.img; tip.appendChild(img); }}
    const caption = document.createElement("div");
    caption.textContent = point.dataset.key + (point.dataset.label ? " - " + point.dataset.label : "");
    tip.appendChild(caption);
    tip.style.display = "block"; tip.style.left = (event.clientX + 12) + "px"; tip.style.top = (event.clientY + 12) + "px";
  }});
  point.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
</script></body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
