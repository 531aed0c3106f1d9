"""UVOSAM: video objects from box tracks — boxes linked into tracks, each track's boxes prompting SAM.

1. **Tracks** (:func:`track_boxes`). Per-frame detections (boxes, scores, classes, appearance
   vectors) are linked at least total cost (Hungarian) in ByteTrack's two score stages, by motion
   (velocity, a gate that grows with the frames between sightings), class (a hard rule) and
   appearance. A track is kept if it was seen in at least ``min_hits`` frames and its mean score
   reaches ``min_score``; its class is the score-weighted majority of its detections' classes (ties:
   the lower class id). Tracks are numbered 1, 2, ... in order of first appearance, and keep that id
   in every frame.
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
4. **One pass** (:func:`video_objects`, masks on every frame): each frame is encoded once; SAM
   follows every object from frame to frame, the head runs on every ``stride``-th frame's embedding,
   and its detections are linked to where SAM found the objects on that frame.

Where this deviates from the public code, and why: the public evaluation numbers a frame's objects
by counting non-empty masks, so an object's id shifts whenever another track is empty in a frame —
ids here are the track's own, in every frame; and later tracks do not simply overwrite earlier
ones (the largest-first rule above).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from usam_backend.core.masks import mask_boxes
from usam_backend.systems.uosam import Predictor

if TYPE_CHECKING:
    from usam_backend.systems.usam import SemanticSegmenter

Detections = tuple[np.ndarray, ...]
"""One frame's detections: boxes (n, 4) float xyxy pixels, scores (n,), class ids (n,), and
optionally appearance vectors (n, d)."""

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
    """How detections are linked, and which tracks are kept (score thresholds and keep rules:
    UVOSAM's public code, where it has them).

    Attributes:
        start_score: a detection at least this confident may start a track (0.2).
        keep_score: detections below this are ignored; between it and ``start_score`` they can only
            continue a track (ByteTrack's second stage) (0.1).
        lost_frames: a track unseen for this many processed frames ends (10).
        min_hits: tracks seen in fewer frames are dropped (3).
        min_score: tracks with a lower mean score are dropped (0.05).
        nms_iou: detections of one frame overlapping a better one by more than this are dropped (0.9).
        max_tracks: at most this many tracks are kept, the highest scoring (PNG palettes hold 255).
        interpolate: fill the frames between two sightings of a track (a missed detection, or the
            frames between strided ones) with linearly interpolated boxes, for gaps of at most
            ``lost_frames + 1`` processed frames. They get a box but no score.
        gate: a detection continues a track only if its centre is within this many object sizes
            (a box's longer side) of where the track is predicted, plus what the
            object may have moved since: ``max_speed`` sizes a frame while its velocity is unsure
            (a track seen once or twice), else twice its speed (it may have turned back) and ``drift``
            sizes a frame (its speed counted as ``max_speed`` at most). The gate grows with the
            frames between sightings, i.e. with the stride.
        max_speed: see ``gate`` (0.5 object sizes a frame).
        drift: see ``gate`` (0.1 object sizes a frame).
        max_size_change: a detection whose box's longer side differs from the track's by more
            than this factor does not continue it (3).
        appearance_weight: the weight of the appearance distance (1 - cosine similarity of the
            detections' appearance vectors, when they have them) against the motion cost (0.5).
        absorb: a detection of another class within this share of a track's gate of where it is
            predicted is most likely that object, named wrongly: it is no sighting of the track (a
            cat box never continues a dog track) and starts no track, but it counts towards the
            track's class, the score-weighted majority of what its object was named (0.5).
    """

    start_score: float = 0.2
    keep_score: float = 0.1
    lost_frames: int = 10
    min_hits: int = 3
    min_score: float = 0.05
    nms_iou: float = 0.9
    max_tracks: int = 255
    interpolate: bool = True
    gate: float = 0.5
    max_speed: float = 0.5
    drift: float = 0.1
    max_size_change: float = 3.0
    appearance_weight: float = 0.5
    absorb: float = 0.5


Sighting = tuple[np.ndarray, float, int]
"""A detection on a track: xyxy box, score, class id."""


@dataclass
class _Live:
    """A track while detections are linked: its sightings, velocity (of its box's centre, pixels a
    frame; None until seen twice), class, appearance and processed frames since it was last seen."""

    seen: dict[int, Sighting]
    last: int
    class_id: int
    velocity: np.ndarray | None = None
    look: np.ndarray | None = None
    misses: int = 0
    speed: float = 0.0
    unconfirmed: int | None = None
    votes: dict[int, float] = field(default_factory=dict)

    def predicted(self, frame: int) -> np.ndarray:
        box = self.seen[self.last][0]
        if self.velocity is None:
            return box
        return box + np.tile(self.velocity * (frame - self.last), 2)

    @property
    def size(self) -> float:
        """The object's size: the median over its last 5 sightings (a box shrinks behind another)."""
        return float(np.median([_size(self.seen[f][0]) for f in sorted(self.seen)[-5:]]))

    def vote(self, class_id: int, score: float) -> bool:
        """Counts a detection's class; True when it is not the track's class (then the detection
        only votes: it is not a sighting). The track's class is the score-weighted majority."""
        self.votes[class_id] = self.votes.get(class_id, 0.0) + score
        other = self.class_id >= 0 and class_id >= 0 and class_id != self.class_id
        self.class_id = min(c for c, v in self.votes.items() if v == max(self.votes.values()))
        return other

    def add(self, frame: int, sighting: Sighting, look: np.ndarray | None, far: bool = False) -> None:
        if self.misses >= 2 and far:  # found again after a while, far from where it was expected:
            # a second sighting must confirm it
            self.unconfirmed = frame
        moved = (_centre(sighting[0]) - _centre(self.seen[self.last][0])) / max(1, frame - self.last)
        before = float(np.linalg.norm(self.velocity)) if self.velocity is not None else 0.0
        self.speed = max(float(np.linalg.norm(moved)), before)
        self.velocity = moved
        if look is not None:
            merged = look if self.look is None else 0.5 * self.look + 0.5 * look
            self.look = merged / max(float(np.linalg.norm(merged)), 1e-12)
        self.seen[frame] = sighting
        self.last = frame
        self.misses = 0

    def confirmed(self) -> dict[int, Sighting]:
        """Its sightings, less a last one found after the track was lost that nothing confirmed
        (most likely a false positive in its grown gate)."""
        if self.unconfirmed is None or self.unconfirmed != self.last:
            return self.seen
        return {f: s for f, s in self.seen.items() if f != self.unconfirmed}


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _size(box: np.ndarray) -> float:
    """A box's longer side: what stays of an object's size while it leaves the frame."""
    return max(1.0, float(box[2] - box[0]), float(box[3] - box[1]))


def _link_costs(
    lives: Sequence[_Live], boxes: np.ndarray, classes: np.ndarray, looks: np.ndarray | None, frame: int,
    opts: TrackOptions,
) -> np.ndarray:  # fmt: skip
    """(tracks, detections) costs of continuing each track with each detection, inf where the
    class differs or the detection is outside the track's gate."""
    costs = np.full((len(lives), len(boxes)), np.inf)
    for i, live in enumerate(lives):
        size, dt = live.size, frame - live.last
        if len(live.seen) < 3:  # a velocity from two sightings (of a false positive?) is not trusted yet
            radius = size * (opts.gate + opts.max_speed * dt)
        else:
            radius = size * (opts.gate + opts.drift * dt) + 2 * min(live.speed, opts.max_speed * size) * dt
        centre = _centre(live.predicted(frame))
        for j, box in enumerate(boxes):
            change = abs(math.log(_size(box) / size))
            distance = float(np.linalg.norm(_centre(box) - centre))
            if distance > radius or change > math.log(opts.max_size_change):
                continue
            cost = distance / radius + 0.5 * change / math.log(opts.max_size_change)
            if live.class_id >= 0 and classes[j] >= 0 and classes[j] != live.class_id:
                if distance > opts.absorb * radius:
                    continue
                cost += 0.3  # a box of another class right where the track is: the object, misnamed
            if looks is not None and live.look is not None:
                cost += opts.appearance_weight * (1 - float(live.look @ looks[j]))
            # tracks seen more recently are surer (DeepSORT's matching cascade, as a cost): one lost
            # behind another object, its gate grown, does not take what a visible one is seen as
            costs[i, j] = cost + 0.15 * live.misses
    return costs


def _assign(costs: np.ndarray) -> list[tuple[int, int]]:
    """The (track, detection) pairs of least total cost, none of infinite cost (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    if costs.size == 0:
        return []
    finite = np.where(np.isfinite(costs), costs, 1e6)
    rows, cols = linear_sum_assignment(finite)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if np.isfinite(costs[r, c])]


def track_boxes(
    detections: Sequence[Detections | None], *, frames: Sequence[int] | None = None, **options: Any
) -> dict[int, Track]:
    """Link per-frame detections into tracks.

    Each processed frame, the confident detections (>= ``start_score``) are matched to the live
    tracks at least total cost (Hungarian), then the weaker ones (>= ``keep_score``) to the tracks
    left unmatched (ByteTrack's two stages). A detection can continue a track only if it has the
    track's class and its centre lies in the track's gate: around the box moved on at the track's
    velocity, as wide as the object may have moved in the frames since it was last seen (so the
    gate widens with the stride). Among those, the cost is the distance to the predicted centre
    (in gate widths), the change of size and, when detections carry appearance vectors, how
    different they look. A confident detection left unmatched starts a track there (its first
    sighting is kept, and so is a clip's or chunk's last frame).

    Args:
        detections: ``detections[i]`` for the i-th processed frame (``None``: nothing found there):
            boxes, scores, classes and optionally (n, d) appearance vectors (e.g. SAM's image
            embedding pooled in each box, :func:`detect`).
        frames: the source frame index of each entry of ``detections`` (default 0, 1, 2, ...), e.g.
            every 5th frame when the detector ran on a stride; the tracks' boxes are keyed by these.
        **options: :class:`TrackOptions` fields.

    Returns:
        track id -> :class:`Track`, ids 1, 2, ... in order of first appearance.
    """
    opts = TrackOptions(**options)
    frames = list(range(len(detections))) if frames is None else list(frames)
    if len(frames) != len(detections):
        raise ValueError(f"{len(detections)} detection entries for {len(frames)} frame indices")
    live: list[_Live] = []
    ended: list[_Live] = []
    for frame, found in zip(frames, detections, strict=True):
        boxes, scores, classes, looks = _clean(found, opts)
        free = list(range(len(live)))
        high = np.flatnonzero(scores >= opts.start_score)
        low = np.flatnonzero((scores >= opts.keep_score) & (scores < opts.start_score))
        for rows, starts in ((high, True), (low, False)):
            left = rows.tolist()
            costs = _link_costs([live[i] for i in free], boxes[left], classes[left],
                                None if looks is None else looks[left], frame, opts)  # fmt: skip
            pairs = _assign(costs)
            matched = [(free[i], left[j]) for i, j in pairs]
            for (t, d), (i, j) in zip(matched, pairs, strict=True):
                if not live[t].vote(int(classes[d]), float(scores[d])):  # a cat box never continues a dog
                    look = None if looks is None else looks[d]
                    far = costs[i, j] - 0.15 * live[t].misses > 0.5
                    live[t].add(frame, (boxes[d], float(scores[d]), int(classes[d])), look, far)
            free = [i for i in free if i not in {t for t, _ in matched}]
            left = [d for d in left if d not in {d for _, d in matched}]
            if starts:  # a confident detection no track continues (nor takes as misnamed) starts one
                for d in left:
                    new = _Live({frame: (boxes[d], float(scores[d]), int(classes[d]))}, frame, int(classes[d]),
                                votes={int(classes[d]): float(scores[d])})  # fmt: skip
                    new.look = None if looks is None else looks[d]
                    live.append(new)
        for i in free:
            live[i].misses += 1
        # ByteTrack's tentative tracks: one seen once and not again on the next processed frame
        # was a false positive (or a class given wrongly); others end after lost_frames
        over = [t.misses > (1 if len(t.seen) == 1 else opts.lost_frames) for t in live]
        ended += [t for t, gone in zip(live, over, strict=True) if gone]
        live = [t for t, gone in zip(live, over, strict=True) if not gone]
    for linked in [*ended, *live]:
        linked.seen = linked.confirmed()
    kept = [
        linked
        for linked in [*ended, *live]
        if len(linked.seen) >= opts.min_hits and np.mean([s for _, s, _ in linked.seen.values()]) >= opts.min_score
    ]
    kept = sorted(kept, key=lambda k: -float(np.mean([v[1] for v in k.seen.values()])))[: opts.max_tracks]
    kept.sort(key=lambda k: (min(k.seen), float(min(k.seen.items())[1][0][0])))
    tracks: dict[int, Track] = {}
    for number, linked in enumerate(kept, start=1):
        track = Track(number, class_id=linked.class_id)
        for frame in sorted(linked.seen):
            box, score, _ = linked.seen[frame]
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


def _clean(
    found: Detections | None, opts: TrackOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Detections above ``keep_score``, with near-duplicates (IoU > ``nms_iou``) removed; their
    appearance vectors normalised (None when the detections have none)."""
    if found is None or len(found[0]) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int), None
    boxes: np.ndarray = np.asarray(found[0], dtype=np.float32).reshape(-1, 4)
    scores: np.ndarray = np.asarray(found[1], dtype=np.float32).reshape(-1)
    classes: np.ndarray = np.asarray(found[2], dtype=int).reshape(-1)
    looks = np.asarray(found[3], dtype=np.float64).reshape(len(boxes), -1) if len(found) > 3 else None
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes in one frame")
    keep = scores >= opts.keep_score
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")
    chosen: list[int] = []
    for i in order:
        if all(_box_iou(boxes[i], boxes[j]) <= opts.nms_iou for j in chosen):
            chosen.append(int(i))
    if looks is None:
        return boxes[chosen], scores[chosen], classes[chosen], None
    picked = looks[keep][chosen]
    return (
        boxes[chosen],
        scores[chosen],
        classes[chosen],
        picked / np.maximum(np.linalg.norm(picked, axis=1, keepdims=True), 1e-12),
    )


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
    lock: Lock | None = None, follow: int | None = None,
) -> list[np.ndarray]:  # fmt: skip
    """Per-frame masks of tracks: :func:`segment_frames` over a list of frames.

    Returns:
        per frame, an HxW map of track ids (0: none), uint8 while the ids are under 256, else int32.
    """
    indices = list(range(len(frames))) if frame_indices is None else list(frame_indices)
    if len(indices) != len(frames):
        raise ValueError(f"{len(frames)} frames for {len(indices)} frame indices")
    return list(segment_frames(frames, tracks, predictor, frame_indices=indices, progress=progress, lock=lock,
                               follow=follow))  # fmt: skip


@dataclass
class _Followed:
    """A track's object as last found while segmenting: its mask, where, how it moves (its mask's
    box, pixels a frame) and its colours on the frame it was last detected."""

    mask: np.ndarray
    at: int
    velocity: np.ndarray
    look: np.ndarray


@dataclass
class _Pending:
    """A frame segmented but not yet painted: an object found later may still be followed back
    into it."""

    frame: np.ndarray
    index: int
    masks: dict[int, np.ndarray]
    boxes: dict[int, np.ndarray]
    embedding: Any = None
    final: bool = False


def segment_frames(
    frames: Iterable[np.ndarray], tracks: TrackBoxes, predictor: Predictor, *,
    frame_indices: Iterable[int] | None = None, progress: Callable[[int], None] | None = None,
    lock: Lock | None = None, follow: int | None = None,
    known: Callable[[int], np.ndarray | None] | None = None, **options: Any,
) -> Iterator[np.ndarray]:  # fmt: skip
    """Per-frame masks of tracks, frame by frame (frames stream in and id maps out; at most
    ``follow + 1`` frames are held).

    On a frame where a track has a box (detected, or interpolated between two sightings), the box
    prompts SAM. Past a track's last sighting and before its first (and around a gap too long to
    interpolate), its object is followed for up to ``follow`` frames, as :func:`follow_object`
    does: the box where SAM last found it, moved on at its velocity and grown, its mask accepted
    only if its area and colours stay the object's. When the tracks were found on a stride, that
    is up to the neighbouring sampled frames. Objects are followed back into the frames still held.
    (Following through a gap between two sightings scored lower on the oracle scenes than the
    interpolated box: a followed box drifts onto an object it passes.)

    Each frame is shown to SAM once (an :class:`~usam_backend.sam.predictor.EnginePredictor`'s
    embedding is kept for the frames still held, so following back costs no encoder pass).

    Args:
        frames: HxWx3 uint8 RGB.
        tracks: track id (>= 1) -> :class:`Track`, or -> {frame index: xyxy box in pixels} (all
            of them sightings).
        predictor: ``SamPredictor``'s interface.
        frame_indices: the frame index of each frame (default 0, 1, 2, ...): the keys the tracks'
            boxes use.
        progress: called with 1 after each frame.
        lock: held around each frame's SAM work.
        follow: frames to follow an object past its sightings (default: the usual gap between
            the tracks' sightings less one, i.e. ``stride - 1``; 0 for tracks given as boxes).
        known: position -> the id map already made for that frame (a resumed run), or None: such
            a frame is not shown to SAM, and the objects are followed on from its masks.
        **options: :class:`FollowOptions` fields.

    Yields:
        per frame, an HxW map of track ids (0: none), uint8 while the ids are under 256, else int32.
        A frame without boxes or objects to follow is not shown to SAM.
    """
    opts = FollowOptions(**options)
    by_frame = boxes_by_frame(tracks)
    sightings = {int(tid): set(t.scores) if isinstance(t, Track) else {int(f) for f in t} for tid, t in tracks.items()}
    ordered = {tid: sorted(seen) for tid, seen in sightings.items()}
    if follow is None:
        gaps = [b - a for seen in ordered.values() for a, b in itertools.pairwise(seen)]
        follow = int(np.median(gaps)) - 1 if gaps and any(isinstance(t, Track) for t in tracks.values()) else 0
    reach = max(0, follow)
    dtype = np.uint8 if max(sightings, default=0) < 256 else np.int32
    state: dict[int, _Followed] = {}
    pending: collections.deque[_Pending] = collections.deque()
    indices = iter(frame_indices) if frame_indices is not None else itertools.count()
    for position, frame in enumerate(frames):
        index = int(next(indices))
        done = known(position) if known is not None else None
        if done is not None:
            item = _Pending(frame, index, {int(t): done == t for t in np.unique(done) if t}, {}, final=True)
            item.boxes = {t: mask_box(m) for t, m in item.masks.items()}
            for tid, mask in item.masks.items():
                _found(state, tid, mask, index, frame, tid in by_frame.get(index, {}))
        else:
            item = _segment_one(frame, index, by_frame, sightings, ordered, state, predictor, reach, lock, opts)
        if reach and not item.final:
            _follow_back(item, pending, by_frame, sightings, state, predictor, reach, lock, opts)
        pending.append(item)
        if progress is not None:
            progress(1)
        while len(pending) > reach:
            yield _painted(pending.popleft(), dtype)
    while pending:
        yield _painted(pending.popleft(), dtype)


def _segment_one(
    frame: np.ndarray, index: int, by_frame: dict[int, dict[int, np.ndarray]], sightings: dict[int, set[int]],
    ordered: dict[int, list[int]], state: dict[int, _Followed], predictor: Predictor, reach: int,
    lock: Lock | None, opts: FollowOptions,
) -> _Pending:  # fmt: skip
    """One frame's masks: a track's box (detected or interpolated) prompts SAM; past its
    sightings, its object is followed."""
    boxes = by_frame.get(index, {})
    prompts: dict[tuple[int, str], np.ndarray] = {}
    for tid, box in boxes.items():  # a sighting, or a box interpolated between two
        clipped = _clip_box(box, frame.shape)
        if clipped is not None:
            prompts[tid, "box"] = clipped
        if index not in sightings[tid] and tid in state and index - state[tid].at <= opts.lost_frames:
            guess = _moved_box(state[tid], index, frame.shape, opts)
            if guess is not None:
                prompts[tid, "follow"] = guess
    for tid, seen in ordered.items():
        if tid in boxes or tid not in state or not seen:
            continue
        before = [f for f in seen if f < index]
        if before and index - before[-1] <= reach and index - state[tid].at <= opts.lost_frames:
            guess = _moved_box(state[tid], index, frame.shape, opts)
            if guess is not None:
                prompts[tid, "follow"] = guess
    item = _Pending(frame, index, {}, {})
    if not prompts:
        return item
    with _held(lock):
        predictor.set_image(frame)
        item.embedding = getattr(predictor, "embedding", None) if reach else None
        answers = _box_masks(predictor, prompts)
    for tid in dict.fromkeys(tid for tid, _ in prompts):
        boxed: np.ndarray | None = answers.get((tid, "box"))
        followed: np.ndarray | None = answers.get((tid, "follow"))
        if followed is not None and not _accepted(frame, followed, state[tid], opts):
            followed = None
        # between sightings, the followed box wins only where the interpolated one cuts the object
        if followed is not None and (boxed is None or followed.sum() > 1.1 * boxed.sum()):
            item.masks[tid], item.boxes[tid] = followed, prompts[tid, "follow"]
        elif boxed is not None and boxed.any():
            item.masks[tid], item.boxes[tid] = boxed, prompts[tid, "box"]
    for tid, mask in item.masks.items():
        _found(state, tid, mask, index, frame, index in sightings[tid])
    return item


def _follow_back(
    item: _Pending, pending: collections.deque[_Pending], by_frame: dict[int, dict[int, np.ndarray]],
    sightings: dict[int, set[int]], state: dict[int, _Followed], predictor: Predictor, reach: int,
    lock: Lock | None, opts: FollowOptions,
) -> None:  # fmt: skip
    """Objects detected on ``item``, followed back into the frames still held (up to ``reach`` of
    them): before a track's first sighting, and between two sightings, where a followed mask over
    10 % larger than the interpolated box's replaces it (the object turned in the gap)."""
    for tid, mask in item.masks.items():
        if item.index not in sightings[tid]:
            continue
        starts = tid not in by_frame.get(item.index - 1, {})
        nxt = by_frame.get(item.index + 1, {}).get(tid)
        velocity = np.asarray(nxt - by_frame[item.index][tid]) if nxt is not None else np.zeros(4)
        back = _Followed(mask, item.index, velocity, _histogram(item.frame, mask))
        for earlier in reversed(list(pending)[-reach:]):
            boxed = tid in by_frame.get(earlier.index, {})
            if earlier.final or earlier.index in sightings[tid] or boxed == starts or (starts and tid in earlier.masks):
                break
            if back.at - earlier.index > opts.lost_frames:
                break
            if not starts and (earlier.embedding is None or not hasattr(predictor, "embedding")):
                break  # only where it costs no encoder pass
            guess = _moved_box(back, earlier.index, earlier.frame.shape, opts)
            if guess is None:
                continue
            with _held(lock):
                if earlier.embedding is not None and hasattr(predictor, "embedding"):
                    setattr(predictor, "embedding", earlier.embedding)  # noqa: B010 (EnginePredictor's)
                else:
                    predictor.set_image(earlier.frame)
                found = _box_mask(predictor, guess)
            if found is not None and _accepted(earlier.frame, found, back, opts):
                if tid not in earlier.masks or found.sum() > 1.1 * earlier.masks[tid].sum():
                    earlier.masks[tid], earlier.boxes[tid] = found, guess
                velocity = (mask_box(back.mask) - mask_box(found)) / (back.at - earlier.index)
                back = _Followed(found, earlier.index, velocity, back.look)


def _follow_batch(
    predictor: Predictor, frame: np.ndarray, index: int, states: Mapping[int, _Followed], opts: FollowOptions,
    rounds: int = 2,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:  # fmt: skip
    """Objects followed onto frame ``index`` (set in ``predictor``) in one decoder batch a round:
    each one's box moved on at its velocity and grown by ``margin``; where SAM's mask runs into a
    side of that box (the object moved further or turned: the box cuts it), that side is pushed out
    by half the box and SAM asked again, up to ``rounds`` times. Returns the accepted masks and the
    boxes that gave them."""
    asked: dict[int, np.ndarray] = {}
    for key, state in states.items():
        guess = _moved_box(state, index, frame.shape, opts)
        if guess is not None:
            asked[key] = guess
    masks = _box_masks(predictor, asked) if asked else {}
    for _ in range(rounds):
        wider = {}
        for key, mask in masks.items():
            grown = _uncut(mask, asked[key], frame.shape)
            if grown is not None:
                wider[key] = grown
        if not wider:
            break
        for key, mask in _box_masks(predictor, wider).items():
            if mask.sum() > masks[key].sum():
                masks[key], asked[key] = mask, wider[key]
    found = {key: mask for key, mask in masks.items() if _accepted(frame, mask, states[key], opts)}
    return found, {key: asked[key] for key in found}


def _one_object(a: np.ndarray, b: np.ndarray, share: float = 0.7) -> bool:
    """Whether two masks are one object: over ``share`` of the smaller one is in the other."""
    inter = np.count_nonzero(a & b)
    return bool(inter and inter > share * min(np.count_nonzero(a), np.count_nonzero(b)))


def _box_pixels(box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool: the pixels inside an xyxy box (pixel edges, rounded)."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    inside = np.zeros(shape[:2], dtype=bool)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return inside


def _inside_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel centre of a mask's pixel farthest from its edge: a point surely on it."""
    x0, y0, x1, y1 = (int(v) for v in mask_box(mask))
    crop = np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1)
    distance = cv2.distanceTransform(crop, cv2.DIST_L2, 3)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return x0 + col - 1 + 0.5, y0 + row - 1 + 0.5


def _uncut(mask: np.ndarray, box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The box with each side that the mask runs into (within half a pixel, away from the image's edge)
    pushed out by half the box's extent; None when the mask touches no side (or is empty)."""
    if not mask.any():
        return None
    h, w = shape[:2]
    x0, y0, x1, y1 = mask_box(mask)
    bx0, by0, bx1, by1 = box
    dx, dy = (bx1 - bx0) / 2, (by1 - by0) / 2
    grown = np.array([
        bx0 - dx if x0 <= bx0 + 0.5 and bx0 > 0 else bx0,
        by0 - dy if y0 <= by0 + 0.5 and by0 > 0 else by0,
        bx1 + dx if x1 >= bx1 - 0.5 and bx1 < w else bx1,
        by1 + dy if y1 >= by1 - 0.5 and by1 < h else by1,
    ])  # fmt: skip
    return _clip_box(grown, shape) if (grown != box).any() else None


def _moved_box(followed: _Followed, index: int, shape: tuple[int, ...], opts: FollowOptions) -> np.ndarray | None:
    """Where a followed object is looked for on frame ``index``: its last mask's box moved on at
    its velocity, grown by ``margin`` on every side."""
    x0, y0, x1, y1 = mask_box(followed.mask) + followed.velocity * (index - followed.at)
    dx, dy = (x1 - x0) * opts.margin, (y1 - y0) * opts.margin
    return _clip_box(np.array([x0 - dx, y0 - dy, x1 + dx, y1 + dy]), shape)


def _accepted(frame: np.ndarray, found: np.ndarray, followed: _Followed, opts: FollowOptions) -> bool:
    """Whether a mask is still the followed object: its area and colours close to the object's."""
    if not found.any():
        return False
    ratio = found.sum() / max(1, followed.mask.sum())
    if not 1 / opts.max_area_change <= ratio <= opts.max_area_change:
        return False
    distance = cv2.compareHist(followed.look, _histogram(frame, found), cv2.HISTCMP_BHATTACHARYYA)
    return bool(distance <= opts.max_appearance_change)


def _found(state: dict[int, _Followed], tid: int, mask: np.ndarray, index: int, frame: np.ndarray, seen: bool) -> None:
    """Track ``tid``'s object was found as ``mask`` on frame ``index`` (``seen``: detected there)."""
    last = state.get(tid)
    velocity = np.zeros(4) if last is None else (mask_box(mask) - mask_box(last.mask)) / max(1, index - last.at)
    look = _histogram(frame, mask) if seen or last is None else last.look
    state[tid] = _Followed(mask, index, velocity, look)


def _painted(item: _Pending, dtype: Any) -> np.ndarray:
    ids = np.zeros(item.frame.shape[:2], dtype=dtype)
    return paint(ids, [(int(m.sum()), tid, m) for tid, m in drop_duplicates(item.masks, item.boxes).items()])


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


def _box_masks(predictor: Predictor, boxes: Mapping[Any, np.ndarray]) -> dict[Any, np.ndarray]:
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
    """The xyxy box (pixel edges) around a non-empty mask, as float64."""
    return mask_boxes(np.asarray(mask, dtype=bool)[None])[0].astype(np.float64)


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


def follow_objects(
    frames: Sequence[np.ndarray], keyframes: Mapping[int, tuple[int, Sequence[float]]], predictor: Predictor, *,
    progress: Callable[[int], None] | None = None, lock: Lock | None = None, **options: Any,
) -> dict[int, dict[int, np.ndarray]]:  # fmt: skip
    """Several objects through a clip, followed together from a box each on a keyframe, as
    :func:`follow_object` follows one: each frame is set in the predictor once per direction (once
    in all when the keyframes are one frame) and all objects' boxes prompt SAM in one batch.

    Args:
        keyframes: object id -> (position of its keyframe in ``frames``, its xyxy box there).
        progress: called with 1 after each frame.
        **options: :class:`FollowOptions` fields.

    Returns:
        object id -> {position: HxW bool mask}, for its keyframe and every frame it was found on.
    """
    opts = FollowOptions(**options)
    for oid, (key, _) in keyframes.items():
        if not 0 <= key < len(frames):
            raise ValueError(f"object {oid}: keyframe {key} is outside the clip's {len(frames)} frames")
    out: dict[int, dict[int, np.ndarray]] = {oid: {} for oid in keyframes}
    if not keyframes:
        return out
    starts: dict[int, _Followed] = {}
    limit = opts.max_frames or len(frames)
    first, last = min(k for k, _ in keyframes.values()), max(k for k, _ in keyframes.values())
    for step, positions in ((1, range(first, len(frames))), (-1, range(last - 1, -1, -1))):
        state: dict[int, _Followed] = {}
        for position in positions:
            prompts: dict[tuple[int, str], np.ndarray] = {}
            for oid, (key, box) in keyframes.items():
                if step == 1 and key == position:
                    clipped = _clip_box(np.asarray(box, dtype=np.float64).reshape(4), frames[key].shape)
                    if clipped is not None:
                        prompts[oid, "box"] = clipped
                elif step == -1 and key == position + 1 and oid in starts:
                    state[oid] = starts[oid]
                followed = state.get(oid)
                if followed is None or (position - key) * step > limit:
                    continue
                if abs(position - followed.at) <= opts.lost_frames:
                    guess = _moved_box(followed, position, frames[position].shape, opts)
                    if guess is not None:
                        prompts[oid, "follow"] = guess
            if prompts:
                with _held(lock):
                    predictor.set_image(frames[position])
                    answers = _box_masks(predictor, prompts)
                for (oid, kind), mask in answers.items():
                    if kind == "box" and mask.any():
                        out[oid][position] = mask
                        starts[oid] = _Followed(mask, position, np.zeros(4), _histogram(frames[position], mask))
                        state[oid] = starts[oid]
                    elif kind == "follow" and _accepted(frames[position], mask, state[oid], opts):
                        out[oid][position] = mask
                        moved = (mask_box(mask) - mask_box(state[oid].mask)) / (position - state[oid].at)
                        state[oid] = _Followed(mask, position, moved, state[oid].look)
            if progress is not None:
                progress(1)
    return {oid: dict(sorted(masks.items())) for oid, masks in out.items()}


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


# --- masks on every frame: objects followed by SAM, the head's detections linked to them ---------


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


@dataclass
class _Object:
    """An object while a clip is segmented: where SAM last found it (mask, frame, its box's velocity
    in pixels a frame, its colours where last detected), its sightings by the head, its class votes
    and its appearance vector."""

    key: int
    mask: np.ndarray
    at: int
    velocity: np.ndarray
    look: np.ndarray
    sightings: dict[int, Sighting] = field(default_factory=dict)
    votes: dict[int, float] = field(default_factory=dict)
    appearance: np.ndarray | None = None
    sampled_misses: int = 0

    @property
    def class_id(self) -> int:
        if not self.votes:
            return -1
        best = max(self.votes.values())
        return min(c for c, v in self.votes.items() if v == best)

    @property
    def box(self) -> np.ndarray:
        return mask_box(self.mask)

    @property
    def size(self) -> float:
        """Its size: the median over its last 5 sightings (a mask shrinks behind another object)."""
        return float(np.median([_size(self.sightings[f][0]) for f in sorted(self.sightings)[-5:]]))

    def predicted(self, index: int) -> np.ndarray:
        return self.box + self.velocity * (index - self.at)

    def sighted(self, index: int, sighting: Sighting, look: np.ndarray | None) -> None:
        self.sightings[index] = sighting
        self.votes[sighting[2]] = self.votes.get(sighting[2], 0.0) + sighting[1]
        if look is not None:
            merged = look if self.appearance is None else 0.5 * self.appearance + 0.5 * look
            self.appearance = merged / max(float(np.linalg.norm(merged)), 1e-12)
        self.sampled_misses = 0


@dataclass
class _Held:
    """A frame segmented but not yet painted: its masks per object, and (while objects may still be
    followed back into it) its pixels and SAM's embedding of it; after that, its masks packed."""

    index: int
    shape: tuple[int, ...]
    masks: dict[int, np.ndarray]
    boxes: dict[int, np.ndarray]
    frame: np.ndarray | None = None
    embedding: Any = None
    packed: dict[int, np.ndarray] = field(default_factory=dict)


def video_objects(
    frames: Iterable[np.ndarray], detector: Detector, predictor: Predictor, *, stride: int,
    frame_indices: Iterable[int] | None = None, min_hits: int | None = None, tracks: dict[int, Track] | None = None,
    window: int | None = None, progress: Callable[[int], None] | None = None, lock: Lock | None = None,
    **options: Any,
) -> Iterator[np.ndarray]:  # fmt: skip
    """Objects through a clip, masks on every frame, in one pass: each frame is shown to SAM once,
    and on every ``stride``-th frame (and the last) the head runs on that same embedding.

    Frame by frame, every object is *followed*: the box where SAM last found it, moved on at its
    velocity and grown by ``margin``, prompts SAM (all objects in one decoder batch), and the mask is
    the object while its area and colours stay the object's (:func:`follow_object`'s checks). When
    two objects' masks are one (the box of an object behind another gives SAM the one in front), the
    object whose predicted box fits the mask better keeps it; the other is not found there and moves
    on at its velocity. On a sampled frame the head's detections are linked to the objects
    (Hungarian): where SAM found an object this frame, a detection continues it when its centre is
    within ``gate`` + ``drift`` of the object's sizes of the mask's box (the object's own position,
    however it turned or bounced since the last sampled frame); where SAM lost it, within the motion
    gate of :func:`track_boxes`. Class is a hard rule (a box of another class right where an object
    is counts as a vote for its class), and appearance vectors add to the cost. A sighting's box
    prompts SAM; the followed mask is kept when over 10 % larger. A confident detection no object
    takes starts one, followed back into the ``stride - 1`` frames before it (their embeddings are
    held: no encoder pass).

    An object is painted once it has ``min_hits`` sightings, on the frames from ``stride - 1``
    before its first sighting to ``stride - 1`` after its last, and through the gaps between its
    sightings where SAM found it: a head's miss on a sampled frame costs nothing while SAM follows
    the object. Id maps leave ``window`` frames after they are segmented (default ``4 * stride``:
    an object confirmed that late is still painted from its start); ids are 1, 2, ... in the order
    objects are first painted (on one frame: by first sighting, then from left to right); objects past
    ``max_tracks`` (255, what a palette PNG holds) are not painted.

    Args:
        frames: HxWx3 uint8 RGB.
        detector: a frame's detections (:func:`head_detector`); called only on the sampled frames.
        predictor: ``SamPredictor``'s interface.
        stride: the head runs on every ``stride``-th frame (from the first) and on the last.
        frame_indices: each frame's index (default 0, 1, 2, ...).
        min_hits: sightings an object needs to be painted (default :class:`TrackOptions`'s 3).
        tracks: if given, filled with each painted object's :class:`Track` (its mask's box on each
            painted frame, its detection scores on its sightings, its class).
        window: see above.
        progress: called with 1 after each frame.
        lock: held around each frame's model work.
        **options: :class:`TrackOptions` and :class:`FollowOptions` fields.

    Yields:
        per frame, an HxW map of object ids (0: none), uint8 while the ids are under 256.
    """
    linking = {k: v for k, v in options.items() if k in TrackOptions.__dataclass_fields__}
    following = {k: v for k, v in options.items() if k in FollowOptions.__dataclass_fields__}
    unknown = set(options) - set(linking) - set(following)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    run = _ObjectsRun(detector, predictor, max(1, stride), TrackOptions(**linking), FollowOptions(**following),
                      min_hits, tracks if tracks is not None else {}, window, lock)  # fmt: skip
    indices = iter(frame_indices) if frame_indices is not None else itertools.count()
    first: int | None = None
    for frame, last in _with_last(frames):
        index = int(next(indices))
        first = index if first is None else first
        run.frame(frame, index, (index - first) % run.stride == 0 or last)
        if progress is not None:
            progress(1)
        yield from run.painted(index)
    yield from run.painted(None)


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, whether it is the last)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class _ObjectsRun:
    """:func:`video_objects`' state."""

    def __init__(
        self, detector: Detector, predictor: Predictor, stride: int, link: TrackOptions, follow: FollowOptions,
        min_hits: int | None, tracks: dict[int, Track], window: int | None, lock: Lock | None,
    ) -> None:  # fmt: skip
        self.detector, self.predictor, self.stride, self.link, self.follow = detector, predictor, stride, link, follow
        self.min_hits = link.min_hits if min_hits is None else min_hits
        self.tracks, self.lock = tracks, lock
        self.window = 4 * stride if window is None else max(window, stride)
        self.reach = stride - 1
        self.live: list[_Object] = []
        self.objects: dict[int, _Object] = {}
        self.held: collections.deque[_Held] = collections.deque()
        self.ids: dict[int, int] = {}
        self.keys = itertools.count(1)
        self.dtype: Any = np.uint8
        self.current: Any = None

    # -- one frame ---------------------------------------------------------------------------

    def frame(self, frame: np.ndarray, index: int, sampled: bool) -> None:
        item = _Held(index, frame.shape, {}, {})
        chasing = [o for o in self.live if index - o.at <= self.follow.lost_frames]
        if not chasing and not sampled:
            self._hold(item, frame, None)
            return
        with _held(self.lock):
            self.predictor.set_image(frame)
            embedding = self.current = getattr(self.predictor, "embedding", None)
            found = self.detector(frame, embedding) if sampled else None
            states = {o.key: self._as_followed(o.key) for o in chasing}
            followed, asked = _follow_batch(self.predictor, frame, index, states, self.follow)
            followed = self._one_object_each(followed, index)
            followed.update(self._behind(frame, index, states, followed, asked))
        if sampled:
            self._link(item, frame, index, _clean(found, self.link), followed, asked)
        for key, mask in followed.items():
            if key not in item.masks:
                item.masks[key], item.boxes[key] = mask, asked[key]
        for key, mask in item.masks.items():
            obj = self.objects[key]
            if obj.at != index:
                obj.velocity = (mask_box(mask) - obj.box) / max(1, index - obj.at)
                obj.mask, obj.at = mask, index
        self._hold(item, frame, embedding)

    def _behind(
        self, frame: np.ndarray, index: int, states: Mapping[int, _Followed], found: Mapping[int, np.ndarray],
        asked: dict[int, np.ndarray],
    ) -> dict[int, np.ndarray]:  # fmt: skip
        """Objects not found where their box holds other objects found on this frame (one passing in
        front of it): SAM asked again with the box and a negative point on each of those objects."""
        out: dict[int, np.ndarray] = {}
        for key, state in states.items():
            if key in found:
                continue
            guess = _moved_box(state, index, frame.shape, self.follow)
            if guess is None:
                continue
            mask = self._without(frame, guess, found.values())
            if mask is not None and _accepted(frame, mask, state, self.follow):
                out[key], asked[key] = mask, guess
        return out

    def _without(self, frame: np.ndarray, box: np.ndarray, others: Iterable[np.ndarray]) -> np.ndarray | None:
        """SAM's mask for a box with a negative point on each of ``others`` in it (objects in front
        of the one wanted), if it is clear of them; None when no other object is in the box."""
        inside = _box_pixels(box, frame.shape)
        there = [m for m in others if (m & inside).any()]
        if not there:
            return None
        masks, _, _ = self.predictor.predict(
            point_coords=np.array([_inside_point(m) for m in there], dtype=np.float64),
            point_labels=np.zeros(len(there), dtype=int), box=box, multimask_output=False,
        )  # fmt: skip
        mask = np.asarray(masks[0]).astype(bool)
        area = max(1, np.count_nonzero(mask))
        return mask if mask.any() and all(np.count_nonzero(mask & m) <= 0.3 * area for m in there) else None

    def _show(self, frame: np.ndarray, embedding: Any) -> None:
        """Sets a held frame in the predictor: its embedding when the predictor keeps one (no encoder pass)."""
        if embedding is not None and hasattr(self.predictor, "embedding"):
            setattr(self.predictor, "embedding", embedding)  # noqa: B010 (EnginePredictor's)
        else:
            self.predictor.set_image(frame)

    def _as_followed(self, key: int) -> _Followed:
        obj = self.objects[key]
        return _Followed(obj.mask, obj.at, obj.velocity, obj.look)

    def _one_object_each(self, followed: dict[int, np.ndarray], index: int) -> dict[int, np.ndarray]:
        """Where two objects' followed masks are one object, the one whose predicted box fits it
        better keeps it."""
        boxes = {key: mask_box(mask) for key, mask in followed.items()}
        fit = {key: _box_iou(boxes[key], self.objects[key].predicted(index)) for key in followed}
        kept = dict(followed)
        for a in sorted(followed, key=lambda k: -fit[k]):
            for b in [k for k in kept if k != a and a in kept and fit[k] <= fit[a]]:
                if _one_object(kept[a], kept[b]):
                    del kept[b]
        return kept

    def _link(
        self, item: _Held, frame: np.ndarray, index: int,
        found: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], followed: dict[int, np.ndarray],
        asked: dict[int, np.ndarray],
    ) -> None:  # fmt: skip
        """The head's detections on a sampled frame: linked to the objects, or new objects. A
        sighting's box prompts SAM only where SAM did not follow the object here, or followed it
        to a box that differs from the detection's (IoU under 0.7); confident detections no object
        takes prompt SAM to start objects. All in one decoder batch."""
        boxes, scores, classes, looks = found
        free = list(self.live)
        high = np.flatnonzero(scores >= self.link.start_score)
        low = np.flatnonzero((scores >= self.link.keep_score) & (scores < self.link.start_score))
        matches: list[tuple[_Object, int]] = []
        fresh: list[int] = []
        for rows, starts in ((high, True), (low, False)):
            left = [int(d) for d in rows]
            picked = None if looks is None else looks[left]
            pairs = _assign(self._costs(free, boxes[left], classes[left], picked, index, followed))
            for i, j in pairs:
                obj, d = free[i], left[j]
                if obj.class_id >= 0 and classes[d] >= 0 and classes[d] != obj.class_id:
                    obj.votes[int(classes[d])] = obj.votes.get(int(classes[d]), 0.0) + float(scores[d])  # misnamed
                else:
                    matches.append((obj, d))
            free = [o for o in free if o.key not in {free[i].key for i, _ in pairs}]
            if starts:
                fresh += [left[j] for j in range(len(left)) if j not in {j for _, j in pairs}]
        need = [
            d for obj, d in matches if obj.key not in followed or _box_iou(mask_box(followed[obj.key]), boxes[d]) < 0.7
        ]
        prompts = {
            d: box
            for d in [*need, *fresh]
            if (box := _clip_box(np.asarray(boxes[d], np.float64), frame.shape)) is not None
        }
        answers: dict[int, np.ndarray] = {}
        if prompts:
            with _held(self.lock):
                self._show(frame, self.current)
                answers = _box_masks(self.predictor, prompts)
        for obj, d in matches:
            obj.sighted(index, (boxes[d], float(scores[d]), int(classes[d])), None if looks is None else looks[d])
            boxed, mine = answers.get(d), followed.get(obj.key)
            if boxed is not None and not self._is_object(frame, boxed, obj, followed):
                # the box gives SAM another object (one in front of this one): asked again without it
                with _held(self.lock):
                    self._show(frame, self.current)
                    boxed = self._without(frame, prompts[d], [*followed.values(), boxed])
                if boxed is not None and not self._is_object(frame, boxed, obj, followed):
                    boxed = None
            if mine is not None and (boxed is None or mine.sum() > 1.1 * boxed.sum()):
                item.masks[obj.key], item.boxes[obj.key] = mine, asked[obj.key]
            elif boxed is not None and boxed.any():
                item.masks[obj.key], item.boxes[obj.key] = boxed, prompts[d]
                obj.look = _histogram(frame, boxed)
        for d in fresh:
            boxed = answers.get(d)
            if boxed is None or not boxed.any() or self._covered(item, followed, boxed):
                continue
            obj = _Object(next(self.keys), boxed, index, np.zeros(4), _histogram(frame, boxed))
            obj.sighted(index, (boxes[d], float(scores[d]), int(classes[d])), None if looks is None else looks[d])
            self.objects[obj.key] = obj
            self.live.append(obj)
            item.masks[obj.key], item.boxes[obj.key] = boxed, prompts[d]
        for obj, _ in matches:  # objects found on this frame, followed back into the frames before
            if obj.key in item.masks:
                self._follow_back(obj, item.masks[obj.key], index, obj.velocity)
        for key in [k for k in item.masks if len(self.objects[k].sightings) == 1 and self.objects[k].at == index]:
            self._follow_back(self.objects[key], item.masks[key], index, np.zeros(4))
        for obj in free:
            obj.sampled_misses += 1
        # an object seen once and not on the next two sampled frames was a false positive; others end
        # after lost_frames sampled frames without a sighting
        self.live = [
            o for o in self.live if o.sampled_misses <= (2 if len(o.sightings) == 1 else self.link.lost_frames)
        ]

    def _is_object(self, frame: np.ndarray, mask: np.ndarray, obj: _Object, found: Mapping[int, np.ndarray]) -> bool:
        """Whether a sighting box's mask is the object: close to it in area and colours, and not
        another object found on this frame."""
        if any(key != obj.key and _one_object(other, mask) for key, other in found.items()):
            return False
        return _accepted(frame, mask, _Followed(obj.mask, obj.at, obj.velocity, obj.look), self.follow)

    def _covered(self, item: _Held, followed: dict[int, np.ndarray], mask: np.ndarray) -> bool:
        """Whether a new detection's mask is an object already there (a second box on one object)."""
        return any(_one_object(other, mask) for other in [*item.masks.values(), *followed.values()])

    def _costs(
        self, objects: Sequence[_Object], boxes: np.ndarray, classes: np.ndarray, looks: np.ndarray | None,
        index: int, followed: dict[int, np.ndarray],
    ) -> np.ndarray:  # fmt: skip
        """(objects, detections) costs: distance to where SAM found the object this frame (or, lost,
        to where its motion puts it) in gate widths, change of size, appearance; inf outside the
        gate or for another class (unless right where the object is: then it is the object, misnamed)."""
        opts = self.link
        costs = np.full((len(objects), len(boxes)), np.inf)
        for i, obj in enumerate(objects):
            mine = followed.get(obj.key)
            size = _size(mask_box(mine)) if mine is not None else obj.size
            if mine is not None:
                centre, radius = _centre(mask_box(mine)), size * (opts.gate + opts.drift)
            else:
                dt = index - obj.at
                speed = min(float(np.linalg.norm(obj.velocity[:2] + obj.velocity[2:]) / 2), opts.max_speed * size)
                centre = _centre(obj.predicted(index))
                radius = size * (opts.gate + opts.drift * dt) + 2 * speed * dt
            for j, box in enumerate(boxes):
                change = abs(math.log(_size(box) / size))
                distance = float(np.linalg.norm(_centre(box) - centre))
                if distance > radius or change > math.log(opts.max_size_change):
                    continue
                cost = distance / radius + 0.5 * change / math.log(opts.max_size_change)
                if obj.class_id >= 0 and classes[j] >= 0 and classes[j] != obj.class_id:
                    if distance > opts.absorb * radius:
                        continue
                    cost += 0.3
                if looks is not None and obj.appearance is not None:
                    cost += opts.appearance_weight * (1 - float(obj.appearance @ looks[j]))
                costs[i, j] = cost + (0.0 if mine is not None else 0.3)
        return costs

    def _follow_back(self, obj: _Object, mask: np.ndarray, index: int, velocity: np.ndarray) -> None:
        """An object found on frame ``index`` (a new object, or a sighting), followed back into the
        held frames that still have their embeddings: where it has no mask there, or one over 10 %
        smaller (a box that cut it), the followed mask is taken; it stops where the object is not
        found, is another object's, or is found as it already was."""
        back = _Followed(mask, index, velocity, obj.look)
        for earlier in reversed(self.held):
            if earlier.frame is None:
                break
            with _held(self.lock):
                self._show(earlier.frame, earlier.embedding)
                found = _follow_batch(self.predictor, earlier.frame, earlier.index, {0: back}, self.follow)[0].get(0)
            if found is None:
                break
            others = [m for key, m in earlier.masks.items() if key != obj.key]
            if any(_one_object(m, found) for m in others):
                break  # another object's
            mine = earlier.masks.get(obj.key)
            if mine is not None:
                if np.count_nonzero(mine & found) > 0.9 * np.count_nonzero(mine | found):
                    break  # as it was found going forward
                if found.sum() <= 1.1 * mine.sum():
                    break
            earlier.masks[obj.key], earlier.boxes[obj.key] = found, mask_box(found)
            step = max(1, back.at - earlier.index)
            back = _Followed(found, earlier.index, (mask_box(back.mask) - mask_box(found)) / step, back.look)

    def _hold(self, item: _Held, frame: np.ndarray, embedding: Any) -> None:
        item.frame, item.embedding = frame, embedding
        self.held.append(item)
        for older in list(self.held)[: max(0, len(self.held) - self.reach - 1)]:
            if older.frame is not None:  # past following back: only its masks are kept, 8 pixels a byte
                older.frame = older.embedding = None
                older.packed = {key: np.packbits(mask) for key, mask in older.masks.items()}
                older.masks = {}

    # -- painting ----------------------------------------------------------------------------

    def painted(self, now: int | None) -> Iterator[np.ndarray]:
        """The id maps of the frames that leave the window (all of them at the clip's end)."""
        while self.held and (now is None or now - self.held[0].index >= self.window):
            item = self.held.popleft()
            height, width = item.shape[:2]
            for key, bits in item.packed.items():
                item.masks[key] = np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)
            masks = {key: m for key, m in item.masks.items() if self._shown(self.objects[key], item.index)}
            kept = drop_duplicates(masks, item.boxes)
            for key in sorted(kept, key=lambda k: (min(self.objects[k].sightings), float(mask_box(kept[k])[0]), k)):
                if key not in self.ids and len(self.ids) >= self.link.max_tracks:
                    del kept[key]  # a palette PNG holds 255 ids: objects past max_tracks are not painted
                elif key not in self.ids:
                    self.ids[key] = len(self.ids) + 1
                    if self.ids[key] >= 256:
                        self.dtype = np.int32
            ids = np.zeros(item.shape[:2], dtype=self.dtype)
            yield paint(ids, [(int(m.sum()), self.ids[key], m) for key, m in kept.items()])
            for key, mask in kept.items():
                self._record(self.objects[key], self.ids[key], item.index, mask)

    def _shown(self, obj: _Object, index: int) -> bool:
        """Whether an object's mask on frame ``index`` is painted: it has ``min_hits`` sightings,
        and the frame is within ``stride - 1`` of one or between two."""
        seen = sorted(obj.sightings)
        if len(seen) < self.min_hits:
            return False
        before = [f for f in seen if f <= index]
        after = [f for f in seen if f >= index]
        return bool(
            (before and index - before[-1] <= self.stride)
            or (after and after[0] - index <= self.stride)
            or (before and after and after[0] - before[-1] <= (self.link.lost_frames + 1) * self.stride)
        )

    def _record(self, obj: _Object, tid: int, index: int, mask: np.ndarray) -> None:
        track = self.tracks.setdefault(tid, Track(tid))
        track.class_id = obj.class_id
        track.boxes[index] = mask_box(mask)
        for frame, (_, score, _) in obj.sightings.items():
            track.scores.setdefault(frame, score)
