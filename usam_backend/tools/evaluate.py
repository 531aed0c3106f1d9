"""Semantic-segmentation metrics, as the papers' tables report them: per-class IoU, mIoU and pixel
accuracy from one confusion matrix over a data set, ``ignore`` pixels left out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Confusion:
    """Accumulates ``(gt, pred)`` pixel counts over many images."""

    ignore: int | None = 255
    counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        keep = gt != self.ignore if self.ignore is not None else np.ones(gt.shape, dtype=bool)
        pairs = np.stack([gt[keep].astype(np.int64), pred[keep].astype(np.int64)], axis=1)
        if len(pairs) == 0:
            return
        unique, counts = np.unique(pairs, axis=0, return_counts=True)
        for (g, p), n in zip(unique.tolist(), counts.tolist(), strict=True):
            self.counts[(g, p)] = self.counts.get((g, p), 0) + n

    def metrics(self) -> dict[str, Any]:
        """Per ground-truth class IoU, their mean (mIoU) and pixel accuracy."""
        classes = sorted({g for g, _ in self.counts})
        total = sum(self.counts.values())
        correct = sum(n for (g, p), n in self.counts.items() if g == p)
        per_class = {}
        for c in classes:
            tp = self.counts.get((c, c), 0)
            fn = sum(n for (g, p), n in self.counts.items() if g == c and p != c)
            fp = sum(n for (g, p), n in self.counts.items() if p == c and g != c)
            per_class[c] = tp / (tp + fp + fn) if tp + fp + fn else 0.0
        return {
            "iou": per_class,
            "miou": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "pixel_accuracy": correct / total if total else 0.0,
            "pixels": total,
        }


def miou(pred: np.ndarray, gt: np.ndarray, ignore: int | None = 255) -> float:
    """mIoU of one prediction against its ground truth."""
    confusion = Confusion(ignore)
    confusion.add(pred, gt)
    return float(confusion.metrics()["miou"])
