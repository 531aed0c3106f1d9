"""Synthetic scenes for the UO-SAM refinement tests, and a geometric ORACLE over them.

Random weights cannot show that refinement helps, so the tests measure it with an ORACLE that has
SamPredictor's and SamAutomaticMaskGenerator's interfaces: a measuring instrument for the algorithm,
not a stand-in for SAM. It answers a wrong prompt the way SAM would, worse than the right one
(:func:`answers` and :meth:`GeometricOracle.predict` say how), so that swapped or missing prompts,
the wrong pick among three masks, or a cascade that ignores its first pass all cost mIoU."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from video_scenes import box_pixels

SIZE = 160
EDGE = 3
"""A first pass's masks bleed over their object's edge by this many pixels; the cascade cleans them."""
LOW_RES = 256
"""SAM's low-res logits are LOW_RES x LOW_RES over the image padded to a square at bottom-right."""
CORRUPTIONS = ["dilated", "eroded", "shifted", "noisy edges"]

FIGURES = {  # mean mIoU over 4 scenes: coarse, local, local + global (the README's table)
    "dilated": (0.678, 1.000, 1.000),
    "eroded": (0.613, 0.721, 0.956),
    "shifted": (0.624, 0.809, 0.961),
    "noisy edges": (0.794, 0.996, 1.000),
}


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image HWC uint8 RGB, instance map (H, W) int32, semantic map (H, W) uint8): 5 non-touching
    objects (ellipses and rectangles, 12-21 px half-sizes, one per cell of a 3x3 grid) of 3 classes."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((SIZE, SIZE), dtype=np.int32)
    semantic = np.zeros((SIZE, SIZE), dtype=np.uint8)
    image = np.full((SIZE, SIZE, 3), 120, dtype=np.uint8)
    cells = [(r, c) for r in range(3) for c in range(3)]
    for k, index in enumerate(rng.choice(len(cells), size=5, replace=False), start=1):
        r, c = cells[index]
        cy, cx = 27 + r * 53, 27 + c * 53
        hy, hx = rng.integers(12, 22, size=2)
        shape = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if k % 2:
            cv2.ellipse(shape, (int(cx), int(cy)), (int(hx), int(hy)), float(rng.integers(0, 90)), 0, 360, 1, -1)
        else:
            shape[cy - hy : cy + hy, cx - hx : cx + hx] = 1
        region = shape.astype(bool)
        instances[region] = k
        semantic[region] = 1 + k % 3
        image[region] = rng.integers(0, 255, size=3)
    return image, instances, semantic


def corrupt(semantic: np.ndarray, how: str, seed: int) -> np.ndarray:
    """A coarse map from a true one: each class dilated or eroded by 4 px, the map shifted by
    (6, -5) px, or its edges flipped at random (one of :data:`CORRUPTIONS`)."""
    rng = np.random.default_rng(seed)
    kernel = np.ones((9, 9), np.uint8)
    if how == "dilated":
        out = semantic.copy()
        for c in np.unique(semantic)[1:]:
            out[cv2.dilate((semantic == c).astype(np.uint8), kernel).astype(bool)] = c
        return out
    if how == "eroded":
        out = np.zeros_like(semantic)
        for c in np.unique(semantic)[1:]:
            out[cv2.erode((semantic == c).astype(np.uint8), kernel).astype(bool)] = c
        return out
    if how == "shifted":
        return np.roll(semantic, (6, -5), axis=(0, 1))
    if how == "noisy edges":
        edges = cv2.dilate(cv2.Canny(semantic * 60, 1, 1), np.ones((7, 7), np.uint8)).astype(bool)
        flip = edges & (rng.random(semantic.shape) < 0.5)
        out = semantic.copy()
        out[flip] = np.where(semantic[flip] > 0, 0, np.roll(semantic, 4, axis=1)[flip])
        return out
    raise ValueError(how)


def answers(instances: np.ndarray, points=None, labels=None, box=None) -> tuple[np.ndarray, np.ndarray]:
    """SAM's three exact answers to a prompt, (3, H, W) bool — [a part (the object's left half),
    the object, the object grown 7 px into its surroundings] — and their (3,) float32 scores.

    - a positive point gives the object under it; the backdrop (id 0) is an object too;
    - a negative point removes the object under it from every answer (on the object asked for:
      nothing is left);
    - a box gives only the part inside it, so a shifted or shrunken box costs what it would with
      SAM; a box without a positive point gives the object it covers most;
    - the object scores highest, except for a lone positive point (no box, no negative point):
      that prompt is ambiguous, and the grown mask scores highest. (A negative point on the
      backdrop, as the algorithm places it, strips the grown mask back to the object.)

    ``points``: (n, 2) XY pixels; ``labels``: (n,) 1 positive, 0 negative; ``box``: (4,) XYXY."""
    height, width = instances.shape
    pairs = [] if points is None else zip(np.reshape(points, (-1, 2)), np.reshape(labels, -1), strict=True)
    under = [
        (int(instances[y, x]), int(label))
        for (x, y), label in ((np.rint(point).astype(int), label) for point, label in pairs)
        if 0 <= x < width and 0 <= y < height
    ]
    removed = [k for k, label in under if label == 0]
    target = next((k for k, label in under if label == 1 and k not in removed), None)
    inside = np.ones(instances.shape, dtype=bool) if box is None else box_pixels(box, instances.shape)
    if target is None and box is not None:
        ids, counts = np.unique(instances[inside], return_counts=True)
        counts[(ids == 0) | np.isin(ids, removed)] = 0
        target = int(ids[np.argmax(counts)]) if counts.size and counts.max() else None
    whole = (instances == target) & inside if target is not None else np.zeros(instances.shape, dtype=bool)
    part = whole.copy()
    if whole.any():
        xs = np.nonzero(whole)[1]
        part[:, (xs.min() + xs.max() + 1) // 2 :] = False
    grown = _grow(whole, 7) & inside & ~np.isin(instances, removed)
    lone = box is None and all(label == 1 for _, label in under)
    scores = [0.5, 0.7, 0.95] if lone else [0.5, 0.95, 0.7]
    return np.stack([part, whole, grown]), np.array(scores, dtype=np.float32)


def low_res_logits(masks: np.ndarray) -> np.ndarray:
    """(C, 256, 256) float32 logits of (C, H, W) bool masks, laid out as SAM's: over the image
    padded to a square at its bottom and right."""
    side = max(masks.shape[1:])
    square = np.zeros((len(masks), side, side), dtype=np.float32)
    square[:, : masks.shape[1], : masks.shape[2]] = masks
    return np.stack([cv2.resize(m, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA) * 20 - 10 for m in square])


def from_low_res(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of (256, 256) low-res logits (the inverse of :func:`low_res_logits`)."""
    side = max(shape)
    return (
        cv2.resize(logits.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)[: shape[0], : shape[1]] > 0
    )


class GeometricOracle:
    """ORACLE with SamPredictor's interface over an instance map. A prompt's answers are
    :func:`answers`'s, and:

    - ``multimask_output=True`` gives all three, each bleeding :data:`EDGE` px over its edge
      (within the box): a first pass is coarse at boundaries;
    - ``multimask_output=False`` with a ``mask_input`` that matches one of the three as this
      prompt's first pass gives them (IoU >= 0.8) gives that one exactly: the cascade pass cleans
      what the first pass found; without a ``mask_input``, or with one that matches none, it gives
      the best-scored answer, bled.

    Shapes are SamPredictor's; with ``record`` every call's prompts and outputs are kept in ``calls``."""

    def __init__(self, instances: np.ndarray, *, record: bool = False):
        self.instances = instances
        self.images = 0
        self.calls: list[dict[str, Any]] | None = [] if record else None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        assert image.shape == (*self.instances.shape, 3) and image.dtype == np.uint8, (image.shape, image.dtype)
        self.images += 1

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        _check_prompt(point_coords, point_labels, box, mask_input)
        if not self.images:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        exact, scores = answers(self.instances, point_coords, point_labels, box)
        inside = np.ones(self.instances.shape, dtype=bool) if box is None else box_pixels(box, self.instances.shape)
        bled = np.stack([_grow(m, EDGE) & inside for m in exact])
        if multimask_output:
            masks = bled
        else:
            matched = self._matched(bled, mask_input)
            chosen = int(np.argmax(scores)) if matched is None else matched
            masks = (bled if matched is None else exact)[[chosen]]
            scores = scores[[chosen]]
        low_res = low_res_logits(masks)
        if self.calls is not None:
            self.calls.append({
                "point_coords": point_coords, "point_labels": point_labels, "box": box, "mask_input": mask_input,
                "multimask_output": multimask_output, "masks": masks, "scores": scores, "low_res": low_res,
            })  # fmt: skip
        return masks, scores, low_res

    def _matched(self, bled: np.ndarray, mask_input: np.ndarray | None) -> int | None:
        """The index of the first-pass mask ``mask_input`` matches best (IoU >= 0.8), or None."""
        if mask_input is None:
            return None
        given = from_low_res(mask_input[0], self.instances.shape)
        ious = [np.count_nonzero(given & m) / max(1, np.count_nonzero(given | m)) for m in bled]
        best = int(np.argmax(ious))
        return best if ious[best] >= 0.8 else None


class WrongOracle(GeometricOracle):
    """ORACLE that answers every prompt with a confident mask somewhere else."""

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        masks, scores, low_res = super().predict(point_coords, point_labels, box, mask_input, multimask_output)
        return np.roll(masks, SIZE // 2, axis=(1, 2)), scores, np.roll(low_res, LOW_RES // 2, axis=(1, 2))


class OracleGenerator:
    """ORACLE with SamAutomaticMaskGenerator's interface: the backdrop, every true object, and each
    object cut in two pieces (over-segmentation), as SAM's records (``segmentation`` (H, W) bool,
    ``area``, ``bbox`` XYWH, ``predicted_iou``, ``stability_score``)."""

    def __init__(self, instances: np.ndarray):
        self.instances = instances

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        assert image.shape == (*self.instances.shape, 3) and image.dtype == np.uint8
        masks = [self.instances == 0]
        for k in np.unique(self.instances)[1:]:
            whole = self.instances == k
            top = whole.copy()
            top[_middle_row(whole) :] = False
            masks += [whole, top, whole & ~top]
        return [_record(mask) for mask in masks]


def _record(mask: np.ndarray) -> dict[str, Any]:
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return {"segmentation": mask, "area": int(mask.sum()), "bbox": bbox, "predicted_iou": 0.95,
            "stability_score": 0.95}  # fmt: skip


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _check_prompt(points, labels, box, mask_input) -> None:
    """SamPredictor's shapes: (n, 2) points with (n,) labels, a (4,) XYXY box, a (1, 256, 256) mask_input."""
    if points is not None:
        assert labels is not None, "point_labels must be supplied if point_coords is supplied."
        assert np.shape(points) == (len(labels), 2) and np.ndim(labels) == 1, (np.shape(points), np.shape(labels))
    if box is not None:
        assert np.shape(box) in ((4,), (1, 4)), np.shape(box)
    if mask_input is not None:
        assert np.shape(mask_input) == (1, LOW_RES, LOW_RES), np.shape(mask_input)


class PointOracle:
    """ORACLE with the automatic mask generator's point interface (``usam_backend.sam.generator.
    PointPrompts``) over an instance map: a grid point is answered with what :class:`OracleGenerator`
    holds for the object under it, so the generator finds an object only where one of its points
    lands. Its three answers: the half of the object the point is in (top or bottom, as
    OracleGenerator cuts it; the backdrop is not cut), the object, and the object grown 7 px into
    its surroundings, scored 0.9, 0.95 and 0.5 (the grown one below the generator's IoU threshold).
    On a crop the instance map is cropped: an object cut by the crop's edge is answered cut."""

    def __init__(self, instances: np.ndarray):
        self.instances = instances
        self.crop = instances
        self.calls = 0
        self._answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_crop(self, image: np.ndarray, crop_box) -> None:
        assert image.shape == (*self.instances.shape, 3) and image.dtype == np.uint8
        x0, y0, x1, y1 = crop_box
        self.crop = self.instances[y0:y1, x0:x1]
        self._answers = {}

    def point_masks(self, points: np.ndarray, iou_threshold: float):
        import torch

        logits, scores = [], []
        height, width = self.crop.shape
        for x, y in np.asarray(points):
            px, py = min(int(x), width - 1), min(int(y), height - 1)
            k = int(self.crop[py, px])
            whole = self.crop == k
            middle = _middle_row(whole) if k else 0
            key = (k, bool(k) and py >= middle)  # the object, and whether the point is in its bottom half
            if key not in self._answers:
                half = whole.copy()
                if k:
                    half[middle:] = False
                    half = whole & ~half if key[1] else half
                masks = np.stack([half, whole, _grow(whole, 7)])
                self._answers[key] = (low_res_logits(masks), np.array([0.9, 0.95, 0.5], dtype=np.float32))
            logits.append(self._answers[key][0])
            scores.append(self._answers[key][1])
            self.calls += 1
        iou = torch.as_tensor(np.stack(scores))
        rows = torch.nonzero((iou > iou_threshold).any(dim=1)).squeeze(1)
        return rows, torch.as_tensor(np.stack(logits))[rows], iou[rows]


def _middle_row(mask: np.ndarray) -> int:
    """The row OracleGenerator cuts an object at: its top half is above it."""
    ys = np.nonzero(mask)[0]
    return int((ys.min() + ys.max()) // 2)
