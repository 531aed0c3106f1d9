"""UVOSAM: video objects from box tracks — boxes linked into tracks, each track's boxes prompting SAM.

1. **Tracks.** Per-frame detections (boxes, scores, classes) are linked by ByteTrack (the
   ``trackers`` package): high-score boxes are matched to the tracks' Kalman-predicted boxes by IoU,
   low-score boxes then revive tracks left unmatched, unmatched high-score boxes start tracks, and a
   track unseen for ``lost_frames`` frames ends. A track is then extended backwards over earlier
   detections left untracked that overlap its first box (ByteTrack needs two sightings in a row
   to start a track, and reports the first as untracked). A track is kept if it was seen in at least
   ``min_hits`` frames and its mean score reaches ``min_score``; its class is the score-weighted
   majority of its detections' classes (ties: the lower class id). Tracks are numbered 1, 2, ... in
   order of first appearance, and keep that id in every frame.
2. **Masks.** Each frame's track boxes prompt SAM (one mask per box, ``multimask_output=False``);
   frames where a track has no box get no mask for it. Two tracks whose masks are one object (the
   box of an occluded object gives SAM the object in front) keep it for the track whose box fits
   it best; the other gets no mask there. Other overlaps: masks are painted largest first, so where
   two tracks claim a pixel the smaller object (usually the one in front) keeps it.
3. **Following one object** (an annotator's keyframe): from the keyframe's box or mask, SAM is
   prompted frame by frame in both directions with the box where the object was last found, moved
   on at its velocity and grown by ``margin``. A mask counts as the object only if its area and its
   colours stay close to the object's (else another object covers it); an object not found for
   ``lost_frames`` frames in a row is given up.

Where this deviates from the public code, and why: the public evaluation numbers a frame's objects
by counting non-empty masks, so an object's id shifts whenever another track is empty in a frame —
ids here are the track's own, in every frame; and later tracks do not simply overwrite earlier
ones (the largest-first rule above).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from usam_backend.systems.uosam import Predictor

if TYPE_CHECKING:
    from usam_backend.systems.usam import SemanticSegmenter

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One frame's detections: boxes (n, 4) float xyxy pixels, scores (n,), class ids (n,)."""

Lock = contextlib.AbstractContextManager[Any]
"""Held around each frame's model work (a ``threading.Lock``), so other requests wait for one frame at most."""


def _held(lock: Lock | None) -> Lock:
    return lock if lock is not None else contextlib.nullcontext()


@dataclass
class Track:
    """One object through a clip.

    Attributes:
        id: 1, 2, ... in order of first appearance; the same in every frame.
        class_id: the score-weighted majority class of its detections (-1: unknown).
        boxes: frame index (0-based) -> xyxy box in pixels, where the object was seen (or
            interpolated between two sightings).
        scores: frame index -> the detection's score, only where the object was detected.
        label: a name for ``class_id`` (filled by whoever knows the classes).
    """

    id: int
    class_id: int = -1
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    label: str = ""

    @property
    def score(self) -> float:
        """The mean of its detection scores."""
        return float(np.mean(list(self.scores.values()))) if self.scores else 0.0

    @property
    def frames(self) -> list[int]:
        return sorted(self.boxes)


@dataclass(frozen=True)
class TrackOptions:
    """ByteTrack's settings and the keep rules (defaults: UVOSAM's public code, where it has them).

    Attributes:
        start_score: a detection at least this confident may start a track (0.2).
        keep_score: detections below this are ignored; between it and ``start_score`` they can only
            continue a track (ByteTrack's second stage) (0.1).
        lost_frames: a track unseen for this many processed frames ends (10).
        min_hits: tracks seen in fewer frames are dropped (3).
        min_score: tracks with a lower mean score are dropped (0.05).
        match_iou: the least IoU between a predicted track box and a detection to link them.
        nms_iou: detections of one frame overlapping a better one by more than this are dropped (0.9).
        max_tracks: at most this many tracks are kept, the highest scoring (PNG palettes hold 255).
        interpolate: fill the frames between two sightings of a track (a missed detection, or the
            frames between strided ones) with linearly interpolated boxes, for gaps of at most
            ``lost_frames + 1`` processed frames. They get a box but no score.
    """

    start_score: float = 0.2
    keep_score: float = 0.1
    lost_frames: int = 10
    min_hits: int = 3
    min_score: float = 0.05
    match_iou: float = 0.1
    nms_iou: float = 0.9
    max_tracks: int = 255
    interpolate: bool = True


def track_boxes(
    detections: Sequence[Detections | None], *, frames: Sequence[int] | None = None, **options: Any
) -> dict[int, Track]:
    """Link per-frame detections into tracks.

    Args:
        detections: ``detections[i]`` for the i-th processed frame (``None``: nothing found there).
        frames: the source frame index of each entry of ``detections`` (default 0, 1, 2, ...), e.g.
            every 5th frame when the detector ran on a stride; the tracks' boxes are keyed by these.
        **options: :class:`TrackOptions` fields.

    Returns:
        track id -> :class:`Track`, ids 1, 2, ... in order of first appearance.
    """
    import supervision as sv
    from trackers import ByteTrackTracker

    opts = TrackOptions(**options)
    frames = list(range(len(detections))) if frames is None else list(frames)
    if len(frames) != len(detections):
        raise ValueError(f"{len(detections)} detection entries for {len(frames)} frame indices")
    tracker = ByteTrackTracker(
        lost_track_buffer=opts.lost_frames, frame_rate=30.0, track_activation_threshold=opts.start_score,
        minimum_consecutive_frames=1, minimum_iou_threshold=opts.match_iou, high_conf_det_threshold=opts.start_score,
    )  # fmt: skip
    raw: dict[int, dict[int, tuple[np.ndarray, float, int]]] = {}  # tracker id -> frame -> (box, score, class)
    untracked: list[list[tuple[np.ndarray, float, int]]] = []  # per position: detections left without a track
    for position, found in enumerate(detections):
        boxes, scores, classes = _clean(found, opts)
        result = tracker.update(
            sv.Detections(xyxy=boxes, confidence=scores, class_id=classes, data={"row": np.arange(len(boxes))})
        )
        untracked.append([])
        ids = result.tracker_id if result.tracker_id is not None else np.zeros(0, dtype=int)
        for row, tid in zip(result.data.get("row", []), ids, strict=True):
            entry = (boxes[row], float(scores[row]), int(classes[row]))
            if tid >= 0:
                raw.setdefault(int(tid), {})[frames[position]] = entry
            else:
                untracked[position].append(entry)
    # ByteTrack reports the detection that starts a track as untracked, and a track needs two
    # sightings in a row to start: extend each track backwards over the untracked detections that
    # overlap its earliest box, across gaps of at most lost_frames.
    position_of = {frame: p for p, frame in enumerate(frames)}
    for seen in sorted(raw.values(), key=lambda s: -max(v[1] for v in s.values())):
        earliest = position_of[min(seen)]
        for q in range(earliest - 1, max(-1, earliest - opts.lost_frames - 2), -1):
            pool = untracked[q]
            overlaps = [_box_iou(seen[frames[earliest]][0], b[0]) for b in pool]
            if overlaps and max(overlaps) >= opts.match_iou:
                seen[frames[q]] = pool.pop(int(np.argmax(overlaps)))
                earliest = q
    # ByteTrack starts no track on a clip's last frame, nor on a one-frame clip: a confident
    # detection still left untracked is an object seen once.
    singletons = [
        {frames[q]: entry} for q, pool in enumerate(untracked) for entry in pool if entry[1] >= opts.start_score
    ]
    kept = [
        seen
        for seen in [*raw.values(), *singletons]
        if len(seen) >= opts.min_hits and np.mean([s for _, s, _ in seen.values()]) >= opts.min_score
    ]
    kept = sorted(kept, key=lambda s: -float(np.mean([v[1] for v in s.values()])))[: opts.max_tracks]
    kept.sort(key=lambda s: (min(s), float(min(s.items())[1][0][0])))
    tracks: dict[int, Track] = {}
    for number, seen in enumerate(kept, start=1):
        votes: dict[int, float] = {}
        for _, score, cls in seen.values():
            votes[cls] = votes.get(cls, 0.0) + score
        best_votes = max(votes.values())
        track = Track(number, class_id=min(c for c, v in votes.items() if v == best_votes))
        for frame in sorted(seen):
            box, score, _ = seen[frame]
            track.boxes[frame] = np.asarray(box, dtype=np.float64)
            track.scores[frame] = score
        if opts.interpolate:
            _interpolate(track, (opts.lost_frames + 1) * _step(frames))
        tracks[number] = track
    return tracks


def sampled_frames(start: int, stop: int, stride: int) -> list[int]:
    """The frames of [start, stop) a detector runs on: every ``stride``-th from ``start``, and the
    last (so a clip no longer than the stride is still seen at both ends, and a track's end is not
    cut at the last multiple of the stride)."""
    chosen = list(range(start, stop, stride))
    return [*chosen, stop - 1] if chosen and chosen[-1] != stop - 1 else chosen


def _step(frames: Sequence[int]) -> int:
    """The usual gap between processed frames (a clip's last frame may come sooner than the stride)."""
    gaps = np.diff(np.asarray(frames))
    return int(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 1


def _interpolate(track: Track, max_gap: int) -> None:
    seen = sorted(track.boxes)
    for a, b in itertools.pairwise(seen):
        if 1 < b - a <= max_gap:
            for f in range(a + 1, b):
                w = (f - a) / (b - a)
                track.boxes[f] = (1 - w) * track.boxes[a] + w * track.boxes[b]
    track.boxes = dict(sorted(track.boxes.items()))


def _clean(found: Detections | None, opts: TrackOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections above ``keep_score``, with near-duplicates (IoU > ``nms_iou``) removed."""
    if found is None or len(found[0]) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int)
    boxes: np.ndarray = np.asarray(found[0], dtype=np.float32).reshape(-1, 4)
    scores: np.ndarray = np.asarray(found[1], dtype=np.float32).reshape(-1)
    classes: np.ndarray = np.asarray(found[2], dtype=int).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes in one frame")
    keep = scores >= opts.keep_score
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")
    chosen: list[int] = []
    for i in order:
        if all(_box_iou(boxes[i], boxes[j]) <= opts.nms_iou for j in chosen):
            chosen.append(int(i))
    return boxes[chosen], scores[chosen], classes[chosen]


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


TrackBoxes = Mapping[int, "Track | Mapping[int, Sequence[float] | np.ndarray]"]


def boxes_by_frame(tracks: TrackBoxes) -> dict[int, dict[int, np.ndarray]]:
    """frame index -> {track id: xyxy box}, from tracks given as :class:`Track` or {frame: box}."""
    out: dict[int, dict[int, np.ndarray]] = {}
    for tid, track in tracks.items():
        if int(tid) < 1:
            raise ValueError(f"track ids start at 1 (0 marks no object), got {tid}")
        boxes = track.boxes if isinstance(track, Track) else track
        for frame, box in boxes.items():
            out.setdefault(int(frame), {})[int(tid)] = np.asarray(box, dtype=np.float64).reshape(4)
    return out


def segment_video(
    frames: Sequence[np.ndarray], tracks: TrackBoxes, predictor: Predictor, *,
    frame_indices: Sequence[int] | None = None, progress: Callable[[int], None] | None = None,
    lock: Lock | None = None,
) -> list[np.ndarray]:  # fmt: skip
    """Per-frame masks of tracks: each frame's track boxes prompt SAM.

    Args:
        frames: HxWx3 uint8 RGB.
        tracks: track id (>= 1) -> :class:`Track`, or -> {frame index: xyxy box in pixels}.
        predictor: ``SamPredictor``'s interface.
        frame_indices: the frame index of each entry of ``frames`` (default 0, 1, 2, ...): the keys
            the tracks' boxes use.
        progress: called with 1 after each frame.
        lock: held around each frame's SAM work.

    Returns:
        per frame, an HxW int32 map of track ids (0: none). A frame without boxes is not shown to SAM.
    """
    indices = list(range(len(frames))) if frame_indices is None else list(frame_indices)
    if len(indices) != len(frames):
        raise ValueError(f"{len(frames)} frames for {len(indices)} frame indices")
    by_frame = boxes_by_frame(tracks)
    out = []
    for frame, index in zip(frames, indices, strict=True):
        boxes = by_frame.get(index, {})
        ids = np.zeros(frame.shape[:2], dtype=np.int32)
        inside = {
            tid: b for tid, b in ((tid, _clip_box(box, frame.shape)) for tid, box in boxes.items()) if b is not None
        }
        if inside:
            with _held(lock):
                predictor.set_image(frame)
                masks = {tid: m for tid, m in _box_masks(predictor, inside).items() if m.any()}
            paint(ids, [(int(m.sum()), tid, m) for tid, m in drop_duplicates(masks, boxes).items()])
        out.append(ids)
        if progress is not None:
            progress(1)
    return out


def drop_duplicates(
    masks: dict[int, np.ndarray], boxes: Mapping[int, np.ndarray], iou: float = 0.7
) -> dict[int, np.ndarray]:
    """When two tracks' masks are one object (mask IoU above ``iou``: the box of an occluded object
    gives SAM the object in front of it), the track whose box fits that mask better keeps it."""
    fit = {tid: _box_iou(mask_box(m), np.asarray(boxes[tid])) for tid, m in masks.items()}
    kept = dict(masks)
    for a in sorted(masks, key=lambda t: -fit[t]):
        if a not in kept:
            continue
        for b in list(kept):
            if b != a and fit[b] <= fit[a]:
                inter = np.count_nonzero(kept[a] & kept[b])
                if inter and inter / np.count_nonzero(kept[a] | kept[b]) > iou:
                    del kept[b]
    return kept


def paint(ids: np.ndarray, masks: Iterable[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """Paint ``(area, track id, mask)`` into ``ids`` largest first (a smaller object over a larger
    one stays visible); equal areas: the lower id last."""
    for _, tid, mask in sorted(masks, key=lambda m: (-m[0], -m[1])):
        ids[mask] = tid
    return ids


def _box_masks(predictor: Predictor, boxes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """One mask per box: in one decoder batch when the predictor offers ``predict_boxes``
    (:class:`~usam_backend.sam.predictor.EnginePredictor` does), else box by box."""
    batched = getattr(predictor, "predict_boxes", None)
    if batched is not None:
        masks, _ = batched(np.stack(list(boxes.values())))
        return {tid: np.asarray(m, dtype=bool) for tid, m in zip(boxes, masks, strict=True)}
    out = {}
    for tid, box in boxes.items():
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        out[tid] = np.asarray(masks[0]).astype(bool)
    return out


def _box_mask(predictor: Predictor, box: np.ndarray | None) -> np.ndarray | None:
    if box is None:
        return None
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    mask = np.asarray(masks[0]).astype(bool)
    return mask if mask.any() else None


def _clip_box(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The box inside the frame, or None when nothing of it is."""
    h, w = shape[:2]
    x0, y0, x1, y1 = np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)
    if not (math.isfinite(float(x0 + y0 + x1 + y1)) and x1 - x0 >= 1 and y1 - y0 >= 1):
        return None
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The xyxy box (pixel edges) around a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@dataclass(frozen=True)
class FollowOptions:
    """How an object is followed from a keyframe.

    Attributes:
        margin: the predicted box is grown by this fraction of its size on every side, to catch the
            object where it moved.
        max_area_change: a mask that grew or shrank by more than this factor since the last frame
            the object was found is not the object.
        max_appearance_change: a mask whose colours differ from the keyframe's object by more than
            this Bhattacharyya distance (0: the same histogram, 1: disjoint) is not the object
            (another object moved in front of it).
        lost_frames: after this many frames in a row without the object, following stops; until
            then its box moves on at its last velocity and is tried again each frame.
        max_frames: follow at most this many frames each way (0: to the clip's ends).
    """

    margin: float = 0.1
    max_area_change: float = 3.0
    max_appearance_change: float = 0.5
    lost_frames: int = 8
    max_frames: int = 0


def follow_object(
    frames: Sequence[np.ndarray], keyframe: int, predictor: Predictor, *, box: Sequence[float] | None = None,
    mask: np.ndarray | None = None, progress: Callable[[int], None] | None = None, lock: Lock | None = None,
    **options: Any,
) -> dict[int, np.ndarray]:  # fmt: skip
    """One object through a clip from an annotator's box or mask on frame ``keyframe`` (a position
    in ``frames``): SAM is prompted frame by frame, forwards then backwards, with the box where the
    object was last found moved on by its velocity. A found mask is the object only if its area and
    colours are close to what the object had; frames where it is not found (occluded) get no mask.

    ``lock`` is held around each frame's SAM work.

    Returns:
        position -> HxW bool mask, for the keyframe and every frame the object was found on.

    Raises:
        ValueError: neither or both of ``box`` and ``mask``, an empty mask, or a keyframe outside the clip.
    """
    opts = FollowOptions(**options)
    if not 0 <= keyframe < len(frames):
        raise ValueError(f"keyframe {keyframe} is outside the clip's {len(frames)} frames")
    if (box is None) == (mask is None):
        raise ValueError("give the keyframe's object as a box or as a mask")
    if mask is not None:
        start = np.asarray(mask, dtype=bool)  # an annotator's mask is kept as drawn on its own frame
        if start.shape != frames[keyframe].shape[:2] or not start.any():
            raise ValueError("the keyframe's mask must be a non-empty HxW mask of the frame's size")
    else:
        clipped = _clip_box(np.asarray(box, dtype=np.float64).reshape(4), frames[keyframe].shape)
        with _held(lock):
            predictor.set_image(frames[keyframe])
            found = _box_mask(predictor, clipped)
        if found is None:
            return {}
        start = found
    look = _histogram(frames[keyframe], start)
    out = {keyframe: start}
    if progress is not None:
        progress(1)
    limit = opts.max_frames or len(frames)
    for step in (1, -1):
        last, last_at, velocity = start, keyframe, np.zeros(4)
        position = keyframe + step
        while 0 <= position < len(frames) and abs(position - keyframe) <= limit:
            if abs(position - last_at) > opts.lost_frames:
                break
            predicted = mask_box(last) + velocity * abs(position - last_at)
            with _held(lock):
                predictor.set_image(frames[position])
                found = _follow_step(predictor, frames[position], predicted, last, look, opts)
            if found is not None:
                velocity = (mask_box(found) - mask_box(last)) / abs(position - last_at)
                out[position] = last = found
                last_at = position
            position += step
            if progress is not None:
                progress(1)
    return dict(sorted(out.items()))


def _follow_step(
    predictor: Predictor, frame: np.ndarray, predicted: np.ndarray, last: np.ndarray, look: np.ndarray,
    opts: FollowOptions,
) -> np.ndarray | None:  # fmt: skip
    """The object on the image set in ``predictor`` (None: not found there)."""
    x0, y0, x1, y1 = predicted
    dx, dy = (x1 - x0) * opts.margin, (y1 - y0) * opts.margin
    found = _box_mask(predictor, _clip_box(np.array([x0 - dx, y0 - dy, x1 + dx, y1 + dy]), frame.shape))
    if found is None:
        return None
    ratio = found.sum() / last.sum()
    if not 1 / opts.max_area_change <= ratio <= opts.max_area_change:
        return None
    distance = cv2.compareHist(look, _histogram(frame, found), cv2.HISTCMP_BHATTACHARYYA)
    return found if distance <= opts.max_appearance_change else None


def _histogram(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colours under a mask: an 8x8x8 RGB histogram, normalised."""
    hist = cv2.calcHist([np.ascontiguousarray(frame)], [0, 1, 2], mask.astype(np.uint8), [8, 8, 8], [0, 256] * 3)
    return cv2.normalize(hist, hist).astype(np.float32)


def tracks_from_masks(masks: Mapping[int, Mapping[int, np.ndarray]], frame_indices: Sequence[int]) -> dict[int, Track]:
    """Tracks (boxes around each mask) from track id -> {position: mask}, keyed by source frame index."""
    tracks = {}
    for tid, per_frame in masks.items():
        track = Track(int(tid))
        for position, mask in per_frame.items():
            if mask.any():
                track.boxes[frame_indices[position]] = mask_box(mask)
                track.scores[frame_indices[position]] = 1.0
        tracks[int(tid)] = track
    return tracks


def detect(
    frames: Iterable[np.ndarray], segmenter: SemanticSegmenter, *, classes: set[str] | None = None,
    progress: Callable[[int], None] | None = None, lock: Lock | None = None,
) -> list[Detections | None]:  # fmt: skip
    """Per frame, the head's regions as detections: each region's box, class probability and class
    (``lock`` held around each frame's model work)."""
    detections: list[Detections | None] = []
    for frame in frames:
        with _held(lock):
            regions = segmenter.segment(frame, classes=classes)
        detections.append((regions.boxes, regions.scores, regions.class_ids) if len(regions) else None)
        if progress is not None:
            progress(1)
    return detections


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
    found = detect(frames, segmenter, classes=classes, progress=progress, lock=lock)
    tracks = track_boxes(found, frames=indices, **options)
    return name_tracks(tracks, segmenter.class_names)


def name_tracks(tracks: dict[int, Track], class_names: Sequence[str]) -> dict[int, Track]:
    """Set each track's ``label`` to its class's name."""
    for track in tracks.values():
        track.label = class_names[track.class_id] if 0 <= track.class_id < len(class_names) else ""
    return tracks
