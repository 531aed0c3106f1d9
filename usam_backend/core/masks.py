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


def box_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) IoU of each XYXY box of ``a`` (n, 4) with the box of ``b`` at the same row; 0 where
    both are empty."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    union = (
        np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
        + np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
        - inter
    )
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


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


def pairwise_mask_ious(masks: np.ndarray) -> np.ndarray:
    """(n, n) IoU of every pair of (n, h, w) bool masks, from one matrix product (0 where both are
    empty): for many small masks, such as SAM's 256x256 ones."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    intersection = flat @ flat.T
    areas = np.diag(intersection)
    union = areas[:, None] + areas[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def low_res_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """:func:`mask_nms` for many small masks at once: (n, h, w) bool, IoUs from one matrix product.

    Used on SAM's 256x256 mask logits before anything is brought to image size, so the work and
    memory do not grow with the image. Returns the kept indices, best score first."""
    n = len(masks)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    iou = pairwise_mask_ious(masks)
    areas = masks.reshape(n, -1).sum(axis=1)
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        if areas[i] > 0 and all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of an (H, W) bool mask, as ``label_studio_sdk``'s ``mask2rle`` of
    ``mask * 255`` gives it, byte for byte, computed from the mask's runs: no 4-channel copy of
    the image, so a 48-megapixel mask costs its runs, not gigabytes. Decoded by
    :func:`usam_backend.core.rle.decode_brush_rle`."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("an empty mask has no brush RLE")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], changes])
    lengths = np.diff(np.concatenate([starts, [flat.size]])) * 4  # every pixel is 4 equal RGBA bytes
    values = np.where(flat[starts], 255, 0)
    bits = [f"{flat.size * 4:032b}", f"{7:05b}", "".join(f"{size - 1:04b}" for size in (3, 4, 8, 16))]
    for length, value in zip(lengths.tolist(), values.tolist(), strict=True):
        byte = f"{value:08b}"
        while length > 2**16:
            bits.append(f"111{2**16 - 1:016b}{byte}")
            length -= 2**16
        if length == 1:
            bits.append(f"000000{byte}")
        elif length <= 8:
            bits.append(f"100{length - 1:03b}{byte}")
        elif length <= 16:
            bits.append(f"101{length - 1:04b}{byte}")
        elif length <= 256:
            bits.append(f"110{length - 1:08b}{byte}")
        else:
            bits.append(f"111{length - 1:016b}{byte}")
    text = "".join(bits)
    text += "0" * (8 - len(text) % 8)
    return list(np.packbits(np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")).tolist())
