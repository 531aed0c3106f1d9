"""Label Studio's prediction format: brush regions (RLE), region scores and the task score.

Task score (Label Studio sorts by it for uncertainty sampling, lowest first): the mean class
probability of the task's regions, 0 for a task without regions. A task whose regions the head
is unsure of, or where it found nothing it knows, is shown to annotators first.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from usam_backend.label_config import ProjectLabel


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
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label.value]},
        "score": round(float(score), 6),
    }


def task_score(region_scores: list[float]) -> float:
    return round(float(np.mean(region_scores)), 6) if region_scores else 0.0


def prediction(results: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """One task's prediction; its score is :func:`task_score` of its regions."""
    return {
        "result": results,
        "score": task_score([float(r["score"]) for r in results]),
        "model_version": model_version,
    }


def region_id(*parts: object) -> str:
    """A stable id for a region, from the model version, task and region index."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]
