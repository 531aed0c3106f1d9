"""The head's regions as detections (:func:`detect`, :func:`head_detector`): boxes from the regions'
low-res masks, with appearance vectors (SAM's embedding pooled in each box, or its colours);
:func:`detect_tracks` links them into named tracks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from usam_backend.core.masks import mask_boxes
from usam_backend.systems.uvosam._common import Detections, Lock, _box_pixels, _held, _histogram
from usam_backend.systems.uvosam.tracks import Track, track_boxes

if TYPE_CHECKING:
    from usam_backend.systems.usam import SemanticSegmenter


def detect(
    frames: Iterable[np.ndarray], segmenter: SemanticSegmenter, *, classes: set[str] | None = None,
    progress: Callable[[int], None] | None = None, lock: Lock | None = None, appearance: bool = False,
) -> list[Detections | None]:  # fmt: skip
    """Per frame, the head's regions as detections: each region's box, class probability and class
    (``lock`` held around each frame's model work).

    With a :class:`~usam_backend.systems.usam.SemanticSegmenter`, boxes are taken from the regions'
    low-res (256x256) masks: no mask is brought to image size. With ``appearance``, each detection
    also gets an appearance vector: SAM's image embedding averaged inside its box (the encoder
    already ran on the frame), or, for a segmenter without a SAM engine, the colours inside its box.
    """
    detections: list[Detections | None] = []
    for frame in frames:
        with _held(lock):
            if hasattr(segmenter, "survivors") and hasattr(segmenter, "engine"):
                found = _low_res_detections(frame, segmenter, classes, appearance)
            else:
                regions = segmenter.segment(frame, classes=classes)
                found = (regions.boxes, regions.scores, regions.class_ids)
                if appearance and len(regions):
                    found = (*found, np.stack([_box_colours(frame, box) for box in regions.boxes]))
        detections.append(found if len(found[0]) else None)
        if progress is not None:
            progress(1)
    return detections


def _low_res_detections(
    frame: np.ndarray, segmenter: SemanticSegmenter, classes: set[str] | None, appearance: bool,
    embedding: Any = None,
) -> Detections:  # fmt: skip
    """Boxes of the head's regions from their low-res masks, and SAM's embedding pooled in them
    (``embedding``: the frame's, when SAM already holds it)."""
    engine = segmenter.engine
    if embedding is None or getattr(embedding, "original_size", None) != tuple(frame.shape[:2]):
        embedding = engine.embed(frame)
    survivors = segmenter.survivors(embedding, classes=classes)
    side = engine.model.image_encoder.img_size
    logits = survivors.candidates.logits
    if not len(logits):  # the head found nothing
        empty: Detections = (np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64))
        return (*empty, np.zeros((0, embedding.features.shape[1]), np.float32)) if appearance else empty
    height = math.ceil(embedding.input_size[0] * logits.shape[-2] / side) if len(logits) else 0
    width = math.ceil(embedding.input_size[1] * logits.shape[-1] / side) if len(logits) else 0
    low = (logits[:, :height, :width] > engine.model.mask_threshold).cpu().numpy()
    nonempty = low.reshape(len(low), -1).any(axis=1)
    scale = embedding.input_size[0] / embedding.original_size[0]  # original pixels -> encoder pixels
    step = side / logits.shape[-1] if len(logits) else 1.0  # encoder pixels per low-res pixel
    boxes = mask_boxes(low[nonempty]).astype(np.float64) * step / scale
    h, w = embedding.original_size
    boxes = np.clip(boxes, 0, [w, h, w, h])
    found: Detections = (boxes, survivors.scores[nonempty], survivors.class_ids[nonempty])
    if appearance:
        found = (*found, _pooled(embedding.features, boxes * scale / side))
    return found


def _pooled(features: Any, boxes: np.ndarray) -> np.ndarray:
    """(n, E) image embedding (1, E, h, w) averaged inside boxes given as fractions of its side."""
    grid = features.shape[-1]
    out = []
    for x0, y0, x1, y1 in boxes:
        c0, r0 = min(grid - 1, int(x0 * grid)), min(grid - 1, int(y0 * grid))
        c1, r1 = max(c0 + 1, math.ceil(x1 * grid)), max(r0 + 1, math.ceil(y1 * grid))
        out.append(features[0, :, r0:r1, c0:c1].float().mean(dim=(1, 2)).cpu().numpy())
    return np.stack(out) if out else np.zeros((0, features.shape[1]), np.float32)


def _box_colours(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The colours inside a box, an 8x8x8 RGB histogram, flattened."""
    return _histogram(frame, _box_pixels(box, frame.shape)).reshape(-1)


def detect_tracks(
    frames: Sequence[np.ndarray], segmenter: SemanticSegmenter, *, frame_indices: Sequence[int] | None = None,
    classes: set[str] | None = None, progress: Callable[[int], None] | None = None, lock: Lock | None = None,
    **options: Any,
) -> dict[int, Track]:  # fmt: skip
    """Tracks of the head's classes (the class-names path): the head segments each frame
    (:func:`detect`) and :func:`track_boxes` links its regions' boxes; each track's ``label`` is
    its class name.

    Args:
        frames: the frames to run the head on (e.g. every 5th frame of a clip).
        frame_indices: their indices in the clip (default 0, 1, 2, ...).
        classes: only these class names (default: all the head knows).
        **options: :class:`TrackOptions` fields.
    """
    indices = list(range(len(frames))) if frame_indices is None else list(frame_indices)
    found = detect(frames, segmenter, classes=classes, progress=progress, lock=lock, appearance=True)
    tracks = track_boxes(found, frames=indices, **options)
    return name_tracks(tracks, segmenter.class_names)


def name_tracks(tracks: dict[int, Track], class_names: Sequence[str]) -> dict[int, Track]:
    """Set each track's ``label`` to its class's name."""
    for track in tracks.values():
        track.label = class_names[track.class_id] if 0 <= track.class_id < len(class_names) else ""
    return tracks


Detector = Callable[[np.ndarray, Any], "Detections | None"]
"""A frame's detections, given the frame and the predictor's embedding of it (None: no embedding
to share, e.g. a predictor that is not an :class:`~usam_backend.sam.predictor.EnginePredictor`)."""


def head_detector(segmenter: Any, *, classes: set[str] | None = None) -> Detector:
    """The head's regions as detections (:func:`detect`'s, with appearance vectors), computed from
    the embedding SAM already holds for the frame when there is one: no second encoder pass."""

    def found(frame: np.ndarray, embedding: Any) -> Detections | None:
        if hasattr(segmenter, "survivors") and hasattr(segmenter, "engine"):
            out = _low_res_detections(frame, segmenter, classes, True, embedding)
        else:
            regions = segmenter.segment(frame, classes=classes)
            out = (regions.boxes, regions.scores, regions.class_ids)
            if len(regions):
                out = (*out, np.stack([_box_colours(frame, box) for box in regions.boxes]))
        return out if len(out[0]) else None

    return found
