"""Following objects with SAM from frame to frame (:func:`follow_object`, :func:`follow_objects`): the
box where an object was last found, moved on at its velocity and grown, prompts SAM, and a mask
counts as the object only while its area and colours stay the object's (the follow checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from usam_backend.systems.uosam import Predictor
from usam_backend.systems.uvosam._common import Lock, _box_mask, _box_masks, _clip_box, _held, _histogram, mask_box
from usam_backend.systems.uvosam.tracks import Track


@dataclass
class _Followed:
    """A track's object as last found while segmenting: its mask, where, how it moves (its mask's
    box, pixels a frame) and its colours on the frame it was last detected."""

    mask: np.ndarray
    at: int
    velocity: np.ndarray
    look: np.ndarray


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
