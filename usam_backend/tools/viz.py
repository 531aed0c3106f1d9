"""Pictures of results: colour label maps and overlays a person can check at a glance."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from usam_backend.core.regions import Regions


def class_colors(count: int) -> np.ndarray:
    """(count, 3) uint8 distinct, stable colours: hues spaced by the golden angle."""
    colors = [colorsys.hsv_to_rgb((0.08 + i * 0.618034) % 1.0, 0.75, 0.95) for i in range(count)]
    return (np.asarray(colors).reshape(count, 3) * 255).round().astype(np.uint8)


def label_map_image(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """A PNG-ready image of a label map whose pixel values stay the class indices (0 background).

    Up to 255 classes: a palette image, so viewers show colours; more: 16-bit grayscale.
    """
    if num_classes > 255:
        return Image.fromarray(label_map.astype(np.uint16))
    image = Image.fromarray(label_map.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1 : num_classes + 1] = class_colors(num_classes)
    image.putpalette(palette.ravel().tolist())
    return image


def overlay(image: np.ndarray, regions: Regions, *, alpha: float = 0.45, note: str | None = None) -> Image.Image:
    """The image with each region tinted in its class colour, outlined, and labelled with its score."""
    colors = class_colors(len(regions.class_names))
    canvas = image.astype(np.float32).copy()
    order = np.argsort(regions.scores, kind="stable")  # most confident painted last, on top
    for i in order:
        mask = regions.masks[i]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colors[regions.class_ids[i]]
    for i in order:
        canvas[_outline(regions.masks[i])] = colors[regions.class_ids[i]]
    picture = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = _font(max(12, min(image.shape[:2]) // 40))
    for i, box in zip(order, regions.boxes[order], strict=True):
        text = f"{regions.class_names[regions.class_ids[i]]} {regions.scores[i]:.2f}"
        _label(draw, (int(box[0]), int(box[1])), text, tuple(int(c) for c in colors[regions.class_ids[i]]), font)
    if note:
        _label(draw, (4, image.shape[0] - font.size - 10), note, (60, 60, 60), font)
    return picture


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, color: tuple[int, ...], font: object) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)  # type: ignore[arg-type]
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=color)
    draw.text(xy, text, fill=(255, 255, 255), font=font)  # type: ignore[arg-type]
