"""Boxes linked into tracks (:func:`track_boxes`): per-frame detections matched to live tracks at
least total cost (Hungarian) in ByteTrack's two score stages, by motion, class and appearance;
tracks kept by hits and score, numbered in order of first appearance, gaps interpolated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from usam_backend.systems.uvosam._common import Detections, Sighting, _box_iou, _centre, _size


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
        gate = _Gate(_centre(live.predicted(frame)), radius, size, live.class_id, live.look)
        for j, box in enumerate(boxes):
            cost = gate.cost(box, int(classes[j]), None if looks is None else looks[j], opts)
            if cost is not None:
                # tracks seen more recently are surer (DeepSORT's matching cascade, as a cost): one lost
                # behind another object, its gate grown, does not take what a visible one is seen as
                costs[i, j] = cost + 0.15 * live.misses
    return costs


@dataclass(frozen=True)
class _Gate:
    """Where an object may be found on a frame: within ``radius`` of ``centre``, about ``size`` big,
    of class ``class_id``, looking like ``look`` (None: not known)."""

    centre: np.ndarray
    radius: float
    size: float
    class_id: int
    look: np.ndarray | None

    def cost(self, box: np.ndarray, class_id: int, look: np.ndarray | None, opts: TrackOptions) -> float | None:
        """The cost of taking ``box`` for the object: its distance from the centre in gate widths,
        its change of size and, when both are known, how different it looks; None outside the
        gate, or for another class unless right where the object is (then the object, misnamed)."""
        change = abs(math.log(_size(box) / self.size))
        distance = float(np.linalg.norm(_centre(box) - self.centre))
        if distance > self.radius or change > math.log(opts.max_size_change):
            return None
        cost = distance / self.radius + 0.5 * change / math.log(opts.max_size_change)
        if self.class_id >= 0 and class_id >= 0 and class_id != self.class_id:
            if distance > opts.absorb * self.radius:
                return None
            cost += 0.3  # a box of another class right where the object is: the object, misnamed
        if look is not None and self.look is not None:
            cost += opts.appearance_weight * (1 - float(self.look @ look))
        return cost


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
