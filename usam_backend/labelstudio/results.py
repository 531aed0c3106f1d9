"""Label Studio's prediction format: regions in the shape each control asks for (brush RLE,
polygons, rectangles, ellipses, video box tracks), region scores and the task score.

Every shape is made from the same mask (:func:`mask_results`), so it carries the same label,
score and model version: a polygon per connected part of the mask (holes bridged, simplified
while its IoU with the part stays at 0.95: :mod:`usam_backend.core.shapes`), the mask's tight box
(not padded, ``rotation: 0``), or the ellipse of the mask's second moments (its radii at most half
the image's width and height, as Label Studio's schema allows).

Task score (Label Studio sorts by it for uncertainty sampling, lowest first): the expected share
of the head's grid-point decisions that are right (:func:`usam_backend.core.regions.decision_confidence`),
averaged over the task's images. Every grid point is a decision, "this is class c" (right with
probability p, its best class probability) or "background" (right with probability 1 - p), so
the score is low when many points sit near the score threshold. Probabilities are calibrated by
temperature on the project's annotated points once it has some. When no confidence is known
(an interactive mask), the score is the mean of the region scores.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from usam_backend.core.masks import brush_rle, mask_boxes
from usam_backend.core.shapes import mask_ellipse, mask_polygons
from usam_backend.labelstudio.config import ProjectLabel


def mask_results(
    mask: np.ndarray, label: ProjectLabel, score: float, region_id: str, item_index: int | None = None
) -> list[dict[str, Any]]:
    """The results of an (H, W) bool mask in the shape ``label``'s control asks for (on frame
    ``item_index`` of a frame sequence): one brush region, rectangle or ellipse, or one polygon per
    part of the mask (the first under ``region_id``, the others under ``region_id-<part>``).
    An empty mask gives none."""
    if label.kind == "brushlabels":
        return [brush_region(mask, label, score, region_id, item_index)]
    height, width = mask.shape
    values: list[dict[str, Any]] = []
    if label.kind == "polygonlabels":
        for polygon in mask_polygons(mask):
            points = [[_percent(x, width), _percent(y, height)] for x, y in polygon]
            values.append({"points": points, "closed": True})
    elif label.kind == "rectanglelabels" and mask.any():
        x0, y0, x1, y1 = (int(v) for v in mask_boxes(mask[None])[0])
        values.append({
            "x": _percent(x0, width), "y": _percent(y0, height), "width": _percent(x1 - x0, width),
            "height": _percent(y1 - y0, height), "rotation": 0,
        })  # fmt: skip
    elif label.kind == "ellipselabels" and (ellipse := mask_ellipse(mask)) is not None:
        values.append({
            "x": _percent(ellipse.cx, width), "y": _percent(ellipse.cy, height),
            "radiusX": min(_percent(ellipse.rx, width), 50.0), "radiusY": min(_percent(ellipse.ry, height), 50.0),
            "rotation": round(ellipse.rotation % 360, 4),
        })  # fmt: skip
    elif label.kind not in ("polygonlabels", "rectanglelabels", "ellipselabels"):
        raise ValueError(f"a mask cannot be given as {label.kind!r}")
    ids = [region_id if part == 0 else f"{region_id}-{part}" for part in range(len(values))]
    return [
        _region(label, {**value, label.kind: [label.value]}, score, rid, (height, width), item_index)
        for rid, value in zip(ids, values, strict=True)
    ]


def brush_region(
    mask: np.ndarray, label: ProjectLabel, score: float, region_id: str, item_index: int | None = None
) -> dict[str, Any]:
    """One ``brushlabels`` result for an (H, W) bool mask (on frame ``item_index`` of a frame sequence)."""
    value = {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label.value]}
    return _region(label, value, score, region_id, mask.shape, item_index, kind="brushlabels")


def _region(
    label: ProjectLabel, value: dict[str, Any], score: float, region_id: str, shape: tuple[int, ...],
    item_index: int | None, kind: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    height, width = shape[:2]
    region: dict[str, Any] = {
        "id": region_id,
        "from_name": label.control,
        "to_name": label.image,
        "type": kind or label.kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 6),
    }
    if item_index is not None:
        region["item_index"] = int(item_index)
    return region


def _percent(pixels: float, extent: int) -> float:
    return round(100.0 * float(pixels) / extent, 4)


def video_rectangle(
    keyframes: dict[int, np.ndarray], continues: set[int], label: ProjectLabel, score: float, region_id: str, *,
    size: tuple[int, int], fps: float, frame_count: int, frame_rate: float,
) -> dict[str, Any]:  # fmt: skip
    """One ``videorectangle`` track.

    Args:
        keyframes: 0-based frame index of the decoded video -> xyxy box in pixels.
        continues: the keyframes after which the track goes on (Label Studio interpolates to the next
            keyframe); after the others it pauses or ends (``enabled: false``).
        size: (width, height) of the frames.
        fps: the decoded video's frame rate; ``frame_rate``: the config's, which Label Studio uses to
            turn times into its 1-based frame numbers (the two may differ).
    """
    width, height = size
    duration = frame_count / fps
    sequence: list[dict[str, Any]] = []
    for index in sorted(keyframes):
        x0, y0, x1, y1 = (float(v) for v in keyframes[index])
        frame = round(index / fps * frame_rate) + 1
        if sequence and sequence[-1]["frame"] == frame:  # a file faster than frameRate: one keyframe per frame
            sequence.pop()
        sequence.append(
            {
                "frame": frame,
                "enabled": index in continues,
                "rotation": 0,
                "x": round(100 * x0 / width, 4),
                "y": round(100 * y0 / height, 4),
                "width": round(100 * (x1 - x0) / width, 4),
                "height": round(100 * (y1 - y0) / height, 4),
                "time": round(frame / frame_rate, 6),
            }
        )
    return {
        "id": region_id,
        "from_name": label.control,
        "to_name": label.image,
        "type": "videorectangle",
        "value": {
            "labels": [label.value],
            "framesCount": round(duration * frame_rate),
            "duration": round(duration, 6),
            "sequence": sequence,
        },
        "score": round(float(score), 6),
    }


def task_score(region_scores: list[float]) -> float:
    return round(float(np.mean(region_scores)), 6) if region_scores else 0.0


def prediction(results: list[dict[str, Any]], model_version: str, confidence: float | None = None) -> dict[str, Any]:
    """One task's prediction, scored by ``confidence`` when known, else :func:`task_score`."""
    if confidence is not None and np.isfinite(confidence):
        score = round(float(confidence), 6)
    else:
        score = task_score([float(r["score"]) for r in results])
    return {"result": results, "score": score, "model_version": model_version}


def shape_part(label: ProjectLabel) -> tuple[str, ...]:
    """What a region's id adds for its shape: nothing for brush regions (their ids predate the
    other shapes), the result type for the others (one mask may be given in several shapes)."""
    return () if label.kind == "brushlabels" else (label.kind,)


def region_id(*parts: object) -> str:
    """A stable id for a region, from the model version, task and region index."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]
