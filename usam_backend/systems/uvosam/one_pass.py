"""Masks on every frame in one pass (:func:`video_objects`): each frame is encoded once, SAM follows
every object from frame to frame, and the head's detections on the sampled frames are linked to
where SAM found the objects.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from usam_backend.systems.uosam import Predictor
from usam_backend.systems.uvosam._common import (
    Lock,
    Sighting,
    _box_iou,
    _box_masks,
    _box_pixels,
    _centre,
    _clip_box,
    _held,
    _histogram,
    _size,
    mask_box,
)
from usam_backend.systems.uvosam.detection import Detector
from usam_backend.systems.uvosam.following import FollowOptions, _accepted, _follow_batch, _Followed, _moved_box
from usam_backend.systems.uvosam.segment import drop_duplicates, paint
from usam_backend.systems.uvosam.tracks import Track, TrackOptions, _assign, _clean, _Gate


def _one_object(a: np.ndarray, b: np.ndarray, share: float = 0.7) -> bool:
    """Whether two masks are one object: over ``share`` of the smaller one is in the other."""
    inter = np.count_nonzero(a & b)
    return bool(inter and inter > share * min(np.count_nonzero(a), np.count_nonzero(b)))


def _inside_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel centre of a mask's pixel farthest from its edge: a point surely on it."""
    x0, y0, x1, y1 = (int(v) for v in mask_box(mask))
    crop = np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1)
    distance = cv2.distanceTransform(crop, cv2.DIST_L2, 3)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return x0 + col - 1 + 0.5, y0 + row - 1 + 0.5


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
            gate = _Gate(centre, radius, size, obj.class_id, obj.appearance)
            for j, box in enumerate(boxes):
                cost = gate.cost(box, int(classes[j]), None if looks is None else looks[j], opts)
                if cost is not None:
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
