"""Pure helpers over boolean masks: boxes, mask NMS, COCO run-length encoding."""

from __future__ import annotations

import numpy as np


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool -> (n, 4) int64 XYXY boxes, max exclusive; an empty mask gives all zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def mask_iou(a: np.ndarray, box_a: np.ndarray, b: np.ndarray, box_b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks, counting the intersection only where their boxes overlap."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    intersection = 0
    if x0 < x1 and y0 < y1:
        intersection = int(np.count_nonzero(a[y0:y1, x0:x1] & b[y0:y1, x0:x1]))
    union = int(a.sum()) + int(b.sum()) - intersection
    return intersection / union if union else 0.0


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression over masks.

    Visits masks by descending score (ties: lower index first) and drops a mask whose IoU with an
    already kept one exceeds ``iou_threshold``. Returns the kept indices in that order.
    """
    order = np.argsort(-scores, kind="stable")
    boxes = mask_boxes(masks)
    kept: list[int] = []
    for i in order:
        if all(mask_iou(masks[i], boxes[i], masks[j], boxes[j]) <= iou_threshold for j in kept):
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def mask_to_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """COCO uncompressed RLE of an (H, W) bool mask: column-major run lengths, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict[str, list[int]]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {height * width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")
