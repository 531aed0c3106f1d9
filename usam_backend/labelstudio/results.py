"""Label Studio's prediction format: brush regions (RLE), region scores and the task score.

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

from usam_backend.core.masks import brush_rle
from usam_backend.labelstudio.config import ProjectLabel


def brush_region(mask: np.ndarray, label: ProjectLabel, score: float, region_id: str) -> dict[str, Any]:
    """One ``brushlabels`` result for an (H, W) bool mask."""
    height, width = mask.shape
    return {
        "id": region_id,
        "from_name": label.control,
        "to_name": label.image,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label.value]},
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


def region_id(*parts: object) -> str:
    """A stable id for a region, from the model version, task and region index."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]
