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
    frame: np.ndarray, segmenter: SemanticSegmenter, classes: set[str] | None, appearance: bool
) -> Detections:
    """Boxes of the head's regions from their low-res masks, and SAM's embedding pooled in them."""
    engine = segmenter.engine
    embedding = engine.embed(frame)
    survivors = segmenter.survivors(embedding, classes=classes)
    side = engine.model.image_encoder.img_size
    logits = survivors.candidates.logits
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
    inside = np.zeros(frame.shape[:2], dtype=bool)
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return _histogram(frame, inside).reshape(-1)


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
