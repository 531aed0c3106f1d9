"""The one result container that flows from inference to every output format (:class:`Regions`),
and one stored labelled region (:class:`Region`: an annotation's or a logged prediction's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from usam_backend.core.masks import mask_boxes, rle_to_mask


@dataclass(frozen=True)
class Regions:
    """Labelled masks of one image, most confident first.

    Attributes:
        masks: (n, H, W) bool, at the image's original size.
        class_ids: (n,) int64 indices into ``class_names``.
        scores: (n,) float32 class probability of each region (the head's).
        points: (n, 2) float32 XY pixel of the grid point (or prompt) that produced the mask.
        sam_scores: (n,) float32 SAM's predicted IoU of the chosen mask.
        class_names: every class the head knows.
        confidence: the image's confidence, :func:`decision_confidence` (NaN when unknown).
    """

    masks: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    points: np.ndarray
    sam_scores: np.ndarray
    class_names: tuple[str, ...]
    confidence: float = float("nan")

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != np.bool_:
            raise ValueError(f"masks must be (n, H, W) bool, got {self.masks.shape} {self.masks.dtype}")
        n = len(self.masks)
        for name, expected in (("class_ids", (n,)), ("scores", (n,)), ("points", (n, 2)), ("sam_scores", (n,))):
            actual = getattr(self, name).shape
            if actual != expected:
                raise ValueError(f"{name} must have shape {expected} for {n} masks, got {actual}")
        if n and (self.class_ids.min() < 0 or self.class_ids.max() >= len(self.class_names)):
            raise ValueError(f"class_ids must index the {len(self.class_names)} class names")

    @classmethod
    def empty(
        cls, image_size: tuple[int, int], class_names: tuple[str, ...], confidence: float = float("nan")
    ) -> Regions:
        return cls(
            masks=np.zeros((0, *image_size), dtype=bool),
            class_ids=np.zeros(0, dtype=np.int64),
            scores=np.zeros(0, dtype=np.float32),
            points=np.zeros((0, 2), dtype=np.float32),
            sam_scores=np.zeros(0, dtype=np.float32),
            class_names=class_names,
            confidence=confidence,
        )

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.class_ids]

    @property
    def boxes(self) -> np.ndarray:
        """(n, 4) int64 XYXY pixel boxes, max exclusive."""
        return mask_boxes(self.masks)

    def select(self, index: np.ndarray) -> Regions:
        """A new Regions with the masks at ``index`` (int indices or a bool mask)."""
        return Regions(
            masks=self.masks[index],
            class_ids=self.class_ids[index],
            scores=self.scores[index],
            points=self.points[index],
            sam_scores=self.sam_scores[index],
            class_names=self.class_names,
            confidence=self.confidence,
        )

    def label_map(self) -> np.ndarray:
        """(H, W) uint16 semantic map: 0 is background, ``k + 1`` is class ``k``.

        Overlaps go to the more confident region (regions are painted least confident first).
        """
        label_map = np.zeros(self.image_size, dtype=np.uint16)
        for i in np.argsort(self.scores, kind="stable"):
            label_map[self.masks[i]] = self.class_ids[i] + 1
        return label_map


def decision_confidence(best_probs: np.ndarray, threshold: float) -> float:
    """The expected share of an image's grid-point decisions that are right.

    Each grid point is either claimed by a class (its best class probability ``p`` reaches the
    score threshold: right with probability ``p``) or left as background (right with probability
    ``1 - p``). The mean over the grid is the image's confidence, in [0, 1]: low when many points
    sit near the threshold, i.e. when the head cannot tell object from background or one class
    from another. With a calibrated head (:mod:`training.calibration`) ``p`` means what it says.
    """
    p = np.asarray(best_probs, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    return float(np.where(p >= threshold, p, 1.0 - p).mean())


@dataclass
class Region:
    """One labelled region: its label and mask (COCO RLE, :func:`usam_backend.core.masks.mask_to_rle`),
    the shape it was drawn as (``brush``, ``polygon``, ``rectangle``, ``ellipse``), and for a frame
    sequence the frame it is on (``item_index``; None on a single image)."""

    id: str
    label: str
    control: str
    image: str
    rle: dict[str, list[int]]
    score: float | None = None
    shape: str = "brush"
    frame: int | None = None

    def mask(self) -> np.ndarray:
        return rle_to_mask(self.rle)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Region:
        keys = ("id", "label", "control", "image", "rle", "score", "shape", "frame")
        return cls(**{key: raw[key] for key in keys if key in raw})
