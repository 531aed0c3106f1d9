"""Small pieces the UVOSAM modules share: the detection and lock types, box geometry (centre,
size, IoU, clipping to the frame), a mask's box and colours, and SAM prompted with boxes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from usam_backend.core.masks import box_ious, mask_boxes
from usam_backend.systems.uosam import Predictor

Detections = tuple[np.ndarray, ...]
"""One frame's detections: boxes (n, 4) float xyxy pixels, scores (n,), class ids (n,), and
optionally appearance vectors (n, d)."""


Lock = contextlib.AbstractContextManager[Any]
"""Held around each frame's model work (a ``threading.Lock``), so other requests wait for one frame at most."""


def _held(lock: Lock | None) -> Lock:
    return lock if lock is not None else contextlib.nullcontext()


Sighting = tuple[np.ndarray, float, int]
"""A detection on a track: xyxy box, score, class id."""


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _size(box: np.ndarray) -> float:
    """A box's longer side: what stays of an object's size while it leaves the frame."""
    return max(1.0, float(box[2] - box[0]), float(box[3] - box[1]))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two XYXY boxes (:func:`~usam_backend.core.masks.box_ious` for one pair)."""
    return float(box_ious(a, b)[0])


def _box_pixels(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool: the pixels inside an xyxy box (pixel edges, rounded)."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    inside = np.zeros(shape[:2], dtype=bool)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return inside


def _box_masks(predictor: Predictor, boxes: Mapping[Any, np.ndarray]) -> dict[Any, np.ndarray]:
    """One mask per box: in one decoder batch when the predictor offers ``predict_boxes``
    (:class:`~usam_backend.sam.predictor.EnginePredictor` does), else box by box."""
    batched = getattr(predictor, "predict_boxes", None)
    if batched is not None:
        masks, _ = batched(np.stack(list(boxes.values())))
        return {tid: np.asarray(m, dtype=bool) for tid, m in zip(boxes, masks, strict=True)}
    out = {}
    for tid, box in boxes.items():
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        out[tid] = np.asarray(masks[0]).astype(bool)
    return out


def _box_mask(predictor: Predictor, box: np.ndarray | None) -> np.ndarray | None:
    if box is None:
        return None
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    mask = np.asarray(masks[0]).astype(bool)
    return mask if mask.any() else None


def _clip_box(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The box inside the frame, or None when nothing of it is."""
    h, w = shape[:2]
    x0, y0, x1, y1 = np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)
    if not (math.isfinite(float(x0 + y0 + x1 + y1)) and x1 - x0 >= 1 and y1 - y0 >= 1):
        return None
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The xyxy box (pixel edges) around a non-empty mask, as float64."""
    return mask_boxes(np.asarray(mask, dtype=bool)[None])[0].astype(np.float64)


def _histogram(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colours under a mask: an 8x8x8 RGB histogram, normalised."""
    hist = cv2.calcHist([np.ascontiguousarray(frame)], [0, 1, 2], mask.astype(np.uint8), [8, 8, 8], [0, 256] * 3)
    return cv2.normalize(hist, hist).astype(np.float32)
