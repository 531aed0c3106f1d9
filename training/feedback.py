"""Annotated tasks -> labelled grid points (in-domain instances) for the next head.

For each annotated image, every grid point is decoded by SAM as at inference (its mask is SAM's
best-IoU-predicted one of three) and compared with the annotator's brush regions:

- the point's mask overlaps an annotated region by IoU >= ``USAM_FEEDBACK_IOU`` (default 0.5):
  a positive instance of that region's label (the best-overlapping region wins);
- else, the point lies inside an annotated region: ignored (its mask is a part, or spills over:
  not clearly right or wrong);
- else: background. That includes every point whose predicted region the annotator removed, and
  every point on something that is none of the project's labels.

Instances are cached by image content, annotation content, SAM weights, grid and threshold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usam_backend.core.fileio import atomic_path
from usam_backend.core.masks import box_ious, mask_boxes
from usam_backend.core.regions import Region
from usam_backend.sam.engine import SamEngine

IGNORE = -2
BACKGROUND = -1


@dataclass
class Instances:
    """x (M, D) float32 point embeddings; y (M,) int64 class index or -1 (background)."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Instances:
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    @classmethod
    def learned(cls, x: np.ndarray, y: np.ndarray) -> Instances:
        """The points of :func:`point_labels`' ``(x, y)`` that teach something: those not ``IGNORE``."""
        keep = y != IGNORE
        return cls(x[keep], y[keep])

    @classmethod
    def concat(cls, parts: list[Instances], dim: int) -> Instances:
        if not parts:
            return cls.empty(dim)
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    def counts(self, class_names: list[str] | tuple[str, ...]) -> dict[str, int]:
        names = {-1: "_background", **dict(enumerate(class_names))}
        values, counts = np.unique(self.y, return_counts=True)
        return {names[int(v)]: int(n) for v, n in zip(values, counts, strict=True)}


@torch.inference_mode()
def point_labels(
    engine: SamEngine, image: np.ndarray, regions: list[Region], label_index: dict[str, int], *, points: int,
    match_iou: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(points, D) embeddings and (points,) labels: class index, -1 background, -2 ignored."""
    height, width = image.shape[:2]
    masks = [_fit(region.mask(), height, width) for region in regions]
    areas = np.array([m.sum() for m in masks], dtype=np.float64)
    embedding = engine.embed(image)
    grid = engine.grid_points(embedding.original_size, points)
    tokens, labels = [], []
    for chunk in engine.decode(embedding, grid):
        tokens.append(chunk.decoded.tokens.float().cpu())
        index = torch.arange(len(chunk.points), device=chunk.decoded.tokens.device)
        multimask = engine.low_res_logits(chunk, index)
        best = chunk.decoded.iou_predictions.argmax(dim=1)
        point_masks = engine.upscale(multimask[index, best], embedding)  # b, H, W
        for (x, y), mask in zip(chunk.points, point_masks, strict=True):
            labels.append(_label(mask, int(y), int(x), masks, areas, regions, label_index, match_iou))
    return torch.cat(tokens).numpy(), np.asarray(labels, dtype=np.int64)


BOX_AGREEMENT_IOU = 0.7
"""SAM's mask for an annotated box stands for the object when its tight box overlaps the drawn box by
this IoU; otherwise the box's interior does (see :func:`box_regions`)."""


@torch.inference_mode()
def box_masks(engine: SamEngine, image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """The mask each XYXY pixel box (a video track's box on this frame) stands for: SAM's mask
    prompted by the box (its best predicted IoU of three) where its tight box agrees with the drawn
    one (IoU >= :data:`BOX_AGREEMENT_IOU`), else the box's interior, as an image rectangle teaches.
    The image is embedded once (and the embedding cached) for every box and for
    :func:`point_labels` after it."""
    height, width = image.shape[:2]
    if not len(boxes):
        return []
    embedding = engine.embed(image)
    batch = engine.predict_prompts(embedding, boxes=np.asarray(boxes, dtype=np.float32))
    assert batch.masks is not None
    out = []
    for box, masks, scores in zip(boxes, batch.masks, batch.iou_predictions, strict=True):
        mask = np.asarray(masks[int(np.argmax(scores))], dtype=bool)
        interior = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        interior[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        agree = mask.any() and box_ious(mask_boxes(mask[None]), box)[0] >= BOX_AGREEMENT_IOU
        out.append(mask if agree else interior)
    return out


def _label(
    mask: np.ndarray, y: int, x: int, regions_masks: list[np.ndarray], areas: np.ndarray, regions: list[Region],
    label_index: dict[str, int], match_iou: float,
) -> int:  # fmt: skip
    best, best_iou = -1, 0.0
    size = mask.sum()
    for i, region in enumerate(regions_masks):
        inter = np.logical_and(mask, region).sum()
        union = size + areas[i] - inter
        iou = inter / union if union else 0.0
        if iou > best_iou:
            best, best_iou = i, iou
    if best >= 0 and best_iou >= match_iou:
        return label_index.get(regions[best].label, IGNORE)  # a label the head does not learn: no lesson
    y, x = min(y, mask.shape[0] - 1), min(x, mask.shape[1] - 1)
    if any(region[y, x] for region in regions_masks):
        return IGNORE
    return BACKGROUND


def _fit(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """An annotated mask at the image's size (Label Studio records the size it was drawn at)."""
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


class InstanceCache:
    """``<root>/<sam fingerprint>/p<points>/<key>.npz`` of (x, labels) per annotated image."""

    def __init__(self, root: Path, fingerprint: str, points: int, match_iou: float):
        self.folder = root / fingerprint / f"p{points}"
        self.match_iou = match_iou

    def key(self, image_digest: str, regions: list[Region]) -> str:
        return self.content_key(image_digest, [[r.label, r.rle] for r in regions])

    def content_key(self, image_digest: str, regions: object) -> str:
        """The key of an image's instances for annotated ``regions`` in any JSON form (a video
        frame's: its boxes and labels, known before SAM turns them into masks)."""
        content = json.dumps([image_digest, self.match_iou, regions], sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:24]

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return data["x"].astype(np.float32), data["labels"].astype(np.int64)
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, x: np.ndarray, labels: np.ndarray) -> None:
        with atomic_path(self.folder / f"{key}.npz") as tmp, tmp.open("wb") as out:
            np.savez(out, x=x.astype(np.float16), labels=labels)
