"""Frame sequences (``<Image valueList>``): one video given as a list of image URLs.

The frames are fetched and checked one at a time: each frame's size is read from its header and
must equal the first frame's, and the running pixel sum must stay within
:data:`SEQUENCE_PIXELS`, both before the frame is decoded; so a hostile sequence costs at most
one frame's download and nothing decoded beyond the budget.

The frames go through :func:`~usam_backend.systems.uvosam.video_objects` in one pass: each frame
is shown to SAM once, the head runs on that embedding on every ``USAM_VIDEO_STRIDE``-th frame and on
the last one, and SAM follows every object on every frame; each object gets one region per frame
in each of its label's shapes, with the frame's ``item_index``. The compute lock is taken per
frame, so a smart-tool click waits for one frame of a sequence at most; a sequence that cannot
finish within the request's deadline raises
:class:`OutOfTime` and is handed to a job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from usam_backend.core.errors import UsamError
from usam_backend.core.images import load_image, peek_size
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Region
from usam_backend.labelstudio.annotations import SHAPES
from usam_backend.labelstudio.config import ProjectLabel
from usam_backend.labelstudio.media import TaskImageFetcher
from usam_backend.labelstudio.results import mask_results, region_id, shape_part
from usam_backend.registry import HeadChoice
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import Lock, Track, TrackOptions, head_detector, sampled_frames, video_objects

SEQUENCE_PIXELS = 200_000_000
"""A frame sequence is held whole while it is predicted: at most this many pixels in all (about
0.6 GB of RGB and 0.8 GB of track-id maps)."""

Basic = tuple[str, str] | None
"""HTTP basic auth Label Studio passes along for task images on allow-listed hosts."""


class OutOfTime(Exception):
    """The request's deadline passed while a sequence was predicted: a job predicts it instead."""


@dataclass(frozen=True)
class SequenceLimits:
    """What one sequence may hold: ``max_frames`` frames (``USAM_SEQUENCE_MAX_FRAMES``), each of
    at most ``max_frame_pixels`` (``USAM_MAX_IMAGE_PIXELS``), at most ``max_pixels`` in all."""

    max_frames: int
    max_frame_pixels: int
    max_pixels: int = SEQUENCE_PIXELS


def sequence_refs(task: dict[str, Any], key: str, limits: SequenceLimits) -> list[str]:
    """The image references of a task's frame-sequence field."""
    data = task.get("data")
    refs = data.get(key) if isinstance(data, dict) else None
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise UsamError(f"task {task.get('id')}: '{key}' must be a list of image URLs (a frame sequence)")
    if len(refs) > limits.max_frames:
        raise UsamError(
            f"task {task.get('id')}: {len(refs)} frames, more than USAM_SEQUENCE_MAX_FRAMES={limits.max_frames}: "
            "sample the sequence, or use a <Video> project"
        )
    return refs


def fetch_frames(
    task: dict[str, Any], refs: list[str], fetcher: TaskImageFetcher, basic: Basic, limits: SequenceLimits
) -> list[np.ndarray]:  # fmt: skip
    """The frames, HxWx3 uint8 RGB, all of one size: each checked before it is decoded (module docs)."""
    task_id = task.get("id") if isinstance(task.get("id"), int) else None
    frames: list[np.ndarray] = []
    first: tuple[int, int] | None = None
    for position, ref in enumerate(refs):
        raw = fetcher.fetch(ref, task_id, basic)
        size = peek_size(raw, max_pixels=limits.max_frame_pixels)
        first = first or size
        if size != first:
            raise UsamError(
                f"task {task.get('id')}: frame {position} is {size[0]}x{size[1]}, frame 0 {first[0]}x{first[1]}: "
                "the frames of a sequence must all have one size"
            )
        if len(refs) * size[0] * size[1] > limits.max_pixels:
            raise UsamError(
                f"task {task.get('id')}: {len(refs)} frames of {size[0]}x{size[1]} are more than "
                f"{limits.max_pixels:,} pixels in all, which one request may hold: sample or shrink them, or use a "
                "<Video> project"
            )
        frames.append(load_image(raw, max_pixels=limits.max_frame_pixels))
        del raw
    return frames


def deadline_check(deadline: float | None) -> Callable[[int], None] | None:
    """A progress callback that raises :class:`OutOfTime` once ``time.monotonic()`` passes ``deadline``."""
    if deadline is None:
        return None

    def check(_: int) -> None:
        if time.monotonic() > deadline:
            raise OutOfTime("the sequence did not finish within USAM_PREDICT_BUDGET")

    return check


def predict_sequence(
    frames: list[np.ndarray], segmenter: SemanticSegmenter, by_class: dict[int, tuple[ProjectLabel, ...]],
    choice: HeadChoice,
    *, task_id: object, image_name: str, stride: int, lock: Lock, deadline: float | None = None,
    logged: list[Region] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Regions of a frame sequence: per track per frame, in each label's shape, with ``item_index``
    (and appended to ``logged`` with their frame, for comparing with the annotation)."""
    sampled = len(sampled_frames(0, len(frames), stride))
    detector = head_detector(segmenter, classes={choice.head.class_names[i] for i in by_class})
    tracks: dict[int, Track] = {}
    maps = list(video_objects(  # whole, so each object's score and class are final before it is named
        frames, detector, EnginePredictor(segmenter.engine), stride=stride, lock=lock,
        progress=deadline_check(deadline), min_hits=min(TrackOptions.min_hits, sampled), tracks=tracks,
    ))  # fmt: skip
    results = []
    for index, ids in enumerate(maps):
        for tid in np.unique(ids[ids > 0]):
            track = tracks[int(tid)]
            for label in by_class[track.class_id]:
                rid = region_id(choice.version, task_id, image_name, index, int(tid), *shape_part(label))
                results += mask_results(ids == tid, label, track.score, rid, item_index=index)
                if logged is not None:
                    logged.append(Region(rid, label.value, label.control, label.image, mask_to_rle(ids == tid),
                                         track.score, shape=SHAPES[label.kind], frame=index))  # fmt: skip
    return results


class FrameCache:
    """The frames of the sequence used last, so the strokes of one smart-brush session on a sequence
    fetch and decode its frames once. One sequence at most (it may hold :data:`SEQUENCE_PIXELS`)."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._frames: list[np.ndarray] = []
        self._guard = threading.Lock()

    def get(
        self, task: dict[str, Any], key: str, fetcher: TaskImageFetcher, basic: Basic, limits: SequenceLimits
    ) -> list[np.ndarray]:  # fmt: skip
        refs = sequence_refs(task, key, limits)
        cache_key = (task.get("id"), fetcher.label_studio_url, basic, limits, tuple(refs))
        with self._guard:
            if self._key == cache_key:
                return self._frames
        frames = fetch_frames(task, refs, fetcher, basic, limits)
        with self._guard:
            self._key, self._frames = cache_key, frames
        return frames
