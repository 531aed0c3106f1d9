"""Masks as the shapes Label Studio draws, and back: polygons, boxes and ellipses.

Coordinates are continuous pixel coordinates: pixel ``(row i, column j)`` covers ``[j, j+1] × [i, i+1]``,
so a W×H image spans ``[0, W] × [0, H]`` (Label Studio's 0–100 % of width and height). Polygons are
rasterised the way COCO's own reader does (``pycocotools``), so the fidelity measured here is the
fidelity every COCO consumer sees.

- :func:`mask_polygons`: one closed polygon per connected part of a mask, simplified as far as its
  IoU with the part stays at ``min_iou`` (0.95). Label Studio polygons have no holes: a hole is
  **bridged** (the outline runs along a zero-width cut into the hole, around it the other way, and
  back), so it stays a hole under both the even-odd and the non-zero fill rule. Parts and holes
  under :data:`MIN_PART_PIXELS` are not drawn: specks are dropped and pinholes filled
  (:func:`drawable`), and the IoU is that with the mask so cleaned.
- :func:`polygons_mask`: the inverse, through pycocotools.
- :func:`mask_ellipse`: the ellipse with the mask's area centroid and second moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

POLYGON_MIN_IOU = 0.95
"""A part's polygon is simplified only as far as its IoU with the part stays at this value."""

MIN_PART_PIXELS = 9
"""Parts (and holes) smaller than this many pixels get no polygon of their own."""

_EPSILONS = (8.0, 4.0, 2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.0)  # simplification tolerances tried, in pixels
_TRACE_PIXELS = 4_000_000  # a part's box is traced at up to 4× resolution while it holds at most this many pixels


@dataclass(frozen=True)
class Ellipse:
    """Centre ``(cx, cy)``, radii ``rx``, ``ry`` and rotation (degrees, clockwise on screen) in pixels."""

    cx: float
    cy: float
    rx: float
    ry: float
    rotation: float


def mask_polygons(mask: np.ndarray, min_iou: float = POLYGON_MIN_IOU) -> list[np.ndarray]:
    """One closed polygon per connected part of an (H, W) bool mask, as (n, 2) float XY arrays
    (the last point is not repeated), largest part first."""
    mask = np.asarray(mask, dtype=bool)
    count, parts, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    found: list[tuple[int, np.ndarray]] = []
    for part in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[part])
        if area < MIN_PART_PIXELS:
            continue
        crop = drawable(parts[y : y + h, x : x + w] == part)
        polygon = _part_polygon(crop, min_iou)
        if polygon is not None:
            found.append((area, polygon + np.array([x, y], dtype=np.float64)))
    return [polygon for _, polygon in sorted(found, key=lambda item: -item[0])]


def drawable(mask: np.ndarray) -> np.ndarray:
    """The mask :func:`mask_polygons` draws: without parts under :data:`MIN_PART_PIXELS`, and with
    holes under that size filled."""
    kept = _without_specks(np.asarray(mask, dtype=bool))
    return ~_without_specks(~np.pad(kept, 1, constant_values=False))[1:-1, 1:-1]


def _without_specks(mask: np.ndarray) -> np.ndarray:
    _, parts, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < MIN_PART_PIXELS)
    small = small[small > 0]
    return mask & ~np.isin(parts, small) if len(small) else mask


def polygons_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of polygons (XY, pixel coordinates), as COCO rasterises them.

    Raises:
        ValueError: a coordinate is not finite or lies beyond ten times the image's size.
    """
    from pycocotools import mask as coco_mask

    arrays = [np.asarray(p, dtype=np.float64) for p in polygons if len(p) >= 3]
    limit = 10.0 * max(height, width)  # pycocotools' rasteriser crashes the process on huge coordinates
    if any(not np.isfinite(a).all() or np.abs(a).max() > limit for a in arrays):
        raise ValueError(f"a polygon has a coordinate that is not finite or beyond ±{limit:g} pixels")
    flat = [a.ravel().tolist() for a in arrays]
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rles = coco_mask.frPyObjects(flat, height, width)
    return np.asarray(coco_mask.decode(coco_mask.merge(rles, intersect=False)), dtype=bool)


def polygon_iou(polygons: list[np.ndarray], mask: np.ndarray) -> float:
    """IoU of polygons, as COCO rasterises them, with an (H, W) bool mask."""
    drawn = polygons_mask(polygons, *mask.shape)
    union = int(np.count_nonzero(drawn | mask))
    return int(np.count_nonzero(drawn & mask)) / union if union else 1.0


def mask_ellipse(mask: np.ndarray) -> Ellipse | None:
    """The ellipse with the mask's centroid and second moments (for a filled ellipse, itself);
    None for an empty mask."""
    moments = cv2.moments(np.asarray(mask, dtype=np.uint8), binaryImage=True)
    area = moments["m00"]
    if area <= 0:
        return None
    cx, cy = moments["m10"] / area + 0.5, moments["m01"] / area + 0.5  # pixel centres sit at +0.5
    # normalised central moments, with the 1/12 a unit pixel adds to each variance
    a, b, c = moments["mu20"] / area + 1 / 12, moments["mu11"] / area, moments["mu02"] / area + 1 / 12
    spread = math.sqrt(max(((a - c) / 2) ** 2 + b * b, 0.0))
    major, minor = (a + c) / 2 + spread, max((a + c) / 2 - spread, 0.0)
    angle = 0.5 * math.degrees(math.atan2(2 * b, a - c))  # of the major axis from +x, y down: clockwise on screen
    return Ellipse(cx, cy, 2 * math.sqrt(major), 2 * math.sqrt(minor), angle)


def ellipse_mask(ellipse: Ellipse, height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of the pixels whose centres lie inside ``ellipse``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    theta = math.radians(ellipse.rotation)
    dx, dy = xs - ellipse.cx, ys - ellipse.cy
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    rx, ry = max(ellipse.rx, 1e-9), max(ellipse.ry, 1e-9)
    return np.asarray((u / rx) ** 2 + (v / ry) ** 2 <= 1.0)


def _part_polygon(part: np.ndarray, min_iou: float) -> np.ndarray | None:
    """The simplest bridged polygon of one connected part (cropped to its box) whose IoU with it
    reaches ``min_iou``; the most faithful one when none does."""
    scale = 4 if part.size * 16 <= _TRACE_PIXELS else 2 if part.size * 4 <= _TRACE_PIXELS else 1
    traced = np.pad(part, 1).astype(np.uint8)
    if scale > 1:
        traced = np.repeat(np.repeat(traced, scale, axis=0), scale, axis=1)
    contours, hierarchy = cv2.findContours(traced, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours or hierarchy is None:
        return None
    outer = max((i for i in range(len(contours)) if hierarchy[0][i][3] < 0), key=lambda i: len(contours[i]))
    holes = [i for i in range(len(contours)) if hierarchy[0][i][3] == outer]

    def to_pixels(contour: np.ndarray) -> np.ndarray:  # traced pixel centres -> part coordinates
        return (contour.reshape(-1, 2).astype(np.float64) + 0.5) / scale - 1.0

    best: np.ndarray | None = None
    for epsilon in _EPSILONS:
        ring = _simplify(contours[outer], epsilon * scale, to_pixels)
        if len(ring) < 3:
            continue
        ring = _oriented(ring, clockwise=False)
        for hole in holes:
            if cv2.contourArea(contours[hole]) < MIN_PART_PIXELS * scale * scale:
                continue
            hole_ring = _simplify(contours[hole], epsilon * scale, to_pixels)
            if len(hole_ring) >= 3:
                ring = _bridge(ring, _oriented(hole_ring, clockwise=True))
        best = ring
        if polygon_iou([ring], part) >= min_iou:
            break
    return best


def _simplify(contour: np.ndarray, epsilon: float, to_pixels: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    points = cv2.approxPolyDP(contour, epsilon, True) if epsilon > 0 else contour
    return to_pixels(points)


def _oriented(ring: np.ndarray, clockwise: bool) -> np.ndarray:
    """``ring`` in the asked orientation (as seen on screen, y down)."""
    x, y = ring[:, 0], ring[:, 1]
    signed = float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))  # > 0: clockwise on screen
    return ring if (signed > 0) == clockwise else ring[::-1]


def _bridge(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One ring that runs from ``ring``'s vertex nearest the hole into the hole, around it, and back."""
    distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    around = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([ring[: i + 1], around, ring[i:]])
