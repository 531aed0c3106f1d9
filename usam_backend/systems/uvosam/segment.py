"""Masks of tracks, frame by frame (:func:`segment_frames`, :func:`segment_video`): each frame's
track boxes prompt SAM, objects are followed past and before their sightings, duplicates of one
object are dropped (:func:`drop_duplicates`) and the masks painted largest first (:func:`paint`).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from usam_backend.systems.uosam import Predictor
from usam_backend.systems.uvosam._common import (
    Lock,
    _box_iou,
    _box_mask,
    _box_masks,
    _clip_box,
    _held,
    _histogram,
    mask_box,
)
from usam_backend.systems.uvosam.following import FollowOptions, _accepted, _Followed, _moved_box
from usam_backend.systems.uvosam.tracks import Track

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
