"""Interactive segmentation: a prompt (points and/or a box) on an image -> one mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from usam_backend.sam.engine import SamEngine


@dataclass(frozen=True)
class PromptMask:
    """One mask for one prompt: (H, W) bool, and SAM's predicted IoU as its score."""

    mask: np.ndarray
    score: float


def segment_prompt(
    engine: SamEngine,
    image: np.ndarray,
    *,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
) -> PromptMask:
    """The mask an annotator means by a prompt on an HxWx3 uint8 RGB image.

    Args:
        points: (n, 2) XY pixels; point_labels: (n,) 1 positive, 0 negative.
        box: (4,) XYXY pixels.

    One click is ambiguous (a part or the whole?): SAM's best of its three masks. Several points
    or a box say enough for one mask. The image embedding is cached, so a second prompt on the
    same image does not run the encoder.
    """
    has_points = points is not None and len(points) > 0
    if not has_points and box is None:
        raise ValueError("a prompt needs at least one point or a box")
    embedding = engine.embed(image)
    single_click = has_points and box is None and len(points) == 1  # type: ignore[arg-type]
    result = engine.predict_prompt(
        embedding,
        points=points if has_points else None,
        labels=point_labels,
        box=box,
        multimask=single_click,
    )
    best = int(np.argmax(result.iou_predictions))
    return PromptMask(result.masks[best], float(result.iou_predictions[best]))
