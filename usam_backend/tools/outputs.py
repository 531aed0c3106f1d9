"""``usam predict``: per image a label-map PNG, a JSON of regions, and optionally an overlay."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usam_backend.core.errors import UsamError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Regions
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.tools.viz import label_map_image, overlay

TINY_WARNING = "SAM weights are random (tiny or no checkpoint): these masks and labels are not from a real model"


@dataclass(frozen=True)
class OutputPaths:
    label_map: Path
    regions: Path
    overlay: Path

    @classmethod
    def for_image(cls, image: Path, out_dir: Path) -> OutputPaths:
        stem = image.stem
        return cls(out_dir / f"{stem}.labels.png", out_dir / f"{stem}.json", out_dir / f"{stem}.overlay.png")


def check_distinct_outputs(images: list[Path], out_dir: Path) -> None:
    """Refuse inputs whose outputs would overwrite each other (same file stem)."""
    seen: dict[str, Path] = {}
    for image in images:
        other = seen.setdefault(image.stem, image)
        if other != image:
            raise UsamError(f"{other} and {image} would write the same outputs in {out_dir}: rename one")


def regions_document(image_path: Path, regions: Regions, segmenter: SemanticSegmenter) -> dict[str, Any]:
    """The JSON written for one image: model facts, class values of the label map, regions."""
    sam = segmenter.engine.sam
    height, width = regions.image_size
    document: dict[str, Any] = {
        "image": str(image_path),
        "width": width,
        "height": height,
        "model": {
            "head_version": segmenter.head.version,
            "sam_type": sam.sam_type,
            "sam_weights": sam.weights,
            "random_weights": sam.random_weights,
            "points": segmenter.points,
            "score_threshold": segmenter.score_threshold,
            "nms_iou": segmenter.nms_iou,
        },
        "label_map_values": {"0": "background", **{str(i + 1): n for i, n in enumerate(segmenter.class_names)}},
        "regions": [
            {
                "label": regions.class_names[int(regions.class_ids[i])],
                "class_id": int(regions.class_ids[i]),
                "score": round(float(regions.scores[i]), 6),
                "sam_score": round(float(regions.sam_scores[i]), 6),
                "box_xyxy": [int(v) for v in box],
                "point_xy": [round(float(v), 2) for v in regions.points[i]],
                "area": int(regions.masks[i].sum()),
                "mask_rle": mask_to_rle(regions.masks[i]),
            }
            for i, box in enumerate(regions.boxes)
        ],
    }
    if sam.random_weights:
        document["warning"] = TINY_WARNING
    return document


def write_outputs(
    image_path: Path, image: np.ndarray, regions: Regions, segmenter: SemanticSegmenter, out_dir: Path, *, viz: bool
) -> list[Path]:
    """Write one image's outputs, each atomically; returns the paths written."""
    paths = OutputPaths.for_image(image_path, out_dir)
    document = regions_document(image_path, regions, segmenter)
    written = [paths.label_map, paths.regions]
    picture = label_map_image(regions.label_map(), len(regions.class_names))
    with atomic_path(paths.label_map) as tmp:
        picture.save(tmp, format="PNG")
    with atomic_path(paths.regions) as tmp:
        tmp.write_text(json.dumps(document, indent=1))
    if viz:
        note = "random SAM weights: not a real model" if segmenter.engine.sam.random_weights else None
        with atomic_path(paths.overlay) as tmp:
            overlay(image, regions, note=note).save(tmp, format="PNG")
        written.append(paths.overlay)
    return written
