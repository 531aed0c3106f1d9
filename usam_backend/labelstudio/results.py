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


def brush_region(
    mask: np.ndarray, label: ProjectLabel, score: float, region_id: str, item_index: int | None = None
) -> dict[str, Any]:
    """One ``brushlabels`` result for an (H, W) bool mask (on frame ``item_index`` of a frame sequence)."""
    height, width = mask.shape
    region: dict[str, Any] = {
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
    if item_index is not None:
        region["item_index"] = int(item_index)
    return region


def video_rectangle(
    keyframes: dict[int, np.ndarray], continues: set[int], label: ProjectLabel, score: float, region_id: str, *,
    size: tuple[int, int], fps: float, frame_count: int, frame_rate: float,
) -> dict[str, Any]:  # fmt: skip
    """One ``videorectangle`` track.

    Args:
        keyframes: 0-based frame index of the decoded video -> xyxy box in pixels.
        continues: the keyframes after which the track goes on (Label Studio interpolates to the next
            keyframe); after the others it pauses or ends (``enabled: false``).
        size: (width, height) of the frames.
        fps: the decoded video's frame rate; ``frame_rate``: the config's, which Label Studio uses to
            turn times into its 1-based frame numbers (the two may differ).
    """
    width, height = size
    duration = frame_count / fps
    sequence: list[dict[str, Any]] = []
    for index in sorted(keyframes):
        x0, y0, x1, y1 = (float(v) for v in keyframes[index])
        frame = round(index / fps * frame_rate) + 1
        if sequence and sequence[-1]["frame"] == frame:  # a file faster than frameRate: one keyframe per frame
            sequence.pop()
        sequence.append(
            {
                "frame": frame,
                "enabled": index in continues,
                "rotation": 0,
                "x": round(100 * x0 / width, 4),
                "y": round(100 * y0 / height, 4),
                "width": round(100 * (x1 - x0) / width, 4),
                "height": round(100 * (y1 - y0) / height, 4),
                "time": round(frame / frame_rate, 6),
            }
        )
    return {
        "id": region_id,
        "from_name": label.control,
        "to_name": label.image,
        "type": "videorectangle",
        "value": {
            "labels": [label.value],
            "framesCount": round(duration * frame_rate),
            "duration": round(duration, 6),
            "sequence": sequence,
        },
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
