"""What annotators did with usam's pre-annotations, per project, on disk.

Layout under ``USAM_MODEL_DIR/feedback/<project>/``:

- ``predictions/<task>.json``: the regions usam last predicted for a task (label, mask RLE, id), and
  for a video task the ``videorectangle`` tracks it posted (:class:`VideoTrackRegion`);
- ``tasks/<task>.json``: the task's latest annotation (its regions of every shape and its video
  tracks, the task data that says where its image or video is) and how it compares with the
  prediction: which predicted regions or tracks the annotator ``kept``, ``removed`` or ``changed``
  (label, outline or course), and which they ``added``;
- ``annotations/<annotation id>``: the task the annotation belongs to (for deletions);
- ``state.json``: how far the webhook event log has been read, how many annotations arrived
  since the last training, and the error that stopped the last catch-up, if any.

The webhook handler only appends the event to the project's event log (fsynced before Label
Studio gets its answer); :meth:`FeedbackStore.catch_up` turns new events into task records later,
in the background. Everything here is derived from that log, so a crash loses nothing: the next
``catch_up`` replays what was not processed, and an event that cannot be processed stops the
catch-up there (its error in the state, shown by ``/health``) until a later catch-up succeeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from usam_backend.core.fileio import atomic_path
from usam_backend.core.masks import box_ious, mask_boxes, mask_iou, mask_to_rle
from usam_backend.core.regions import Region
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.annotations import VIDEO_TRACK, drawn_frames, read_results, read_track
from usam_backend.labelstudio.projects import EventLog

log = logging.getLogger("usam.feedback")

SAME_OUTLINE_IOU = 0.95
"""A region kept with at least this IoU to its prediction counts as kept unchanged."""

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")

TRACK_COMPARED_FRAMES = 500
"""Video tracks are compared on at most this many frames, spread evenly over the frames any track of
the task is drawn on (every frame of a shorter video)."""


@dataclass
class VideoTrackRegion:
    """One ``videorectangle`` track as Label Studio stores it: its keyframes (percent of the frame,
    1-based frames) and the frame count they are expanded to
    (:func:`~usam_backend.labelstudio.annotations.expand_keyframes`)."""

    id: str
    label: str
    control: str
    video: str
    sequence: list[dict[str, Any]]
    frames_count: int
    score: float | None = None
    shape: str = VIDEO_TRACK

    def frames(self) -> list[range]:
        """The frames (1-based) the track is drawn on."""
        return drawn_frames(self.sequence, self.frames_count)

    def boxes(self, at: Iterable[int] | None = None, size: tuple[int, int] = (100, 100)) -> dict[int, np.ndarray]:
        """XYXY boxes on the frames it is drawn on (``at``: only on those of these frames), in pixels
        of a frame of ``size`` (height, width); by default in percent of the frame."""
        result = {"id": self.id, "to_name": self.video, "value": {"sequence": self.sequence}}
        track = read_track(result, self.label, lambda *_: size, lambda _: self.frames_count, at)
        return track.boxes

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VideoTrackRegion:
        keys = ("id", "label", "control", "video", "sequence", "frames_count", "score")
        return cls(**{key: raw[key] for key in keys if key in raw})


@dataclass
class Comparison:
    """Predicted regions the annotator kept, removed or changed; regions they added."""

    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)  # {id, label_from, label_to, iou}
    added: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {key: len(value) for key, value in asdict(self).items()}

    def merged(self, other: Comparison) -> Comparison:
        return Comparison(self.kept + other.kept, self.removed + other.removed, self.changed + other.changed,
                          self.added + other.added)  # fmt: skip


@dataclass
class TaskFeedback:
    task: int
    annotation: int | None
    data: dict[str, Any]
    regions: list[Region]
    comparison: Comparison
    model_version: str | None  # of the prediction compared with, if any
    updated: float = 0.0
    tracks: list[VideoTrackRegion] = field(default_factory=list)

    def digest(self) -> str:
        """Changes whenever what a head would learn from this task changes."""
        content = json.dumps(
            [
                self.task,
                self.data,
                [asdict(r) | {"score": None} for r in self.regions]
                + [asdict(t) | {"score": None} for t in self.tracks],
            ],
            sort_keys=True,
        )
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskFeedback:
        return cls(
            task=int(raw["task"]),
            annotation=raw.get("annotation"),
            data=dict(raw.get("data") or {}),
            regions=[Region.from_dict(r) for r in raw.get("regions", [])],
            comparison=Comparison(**raw.get("comparison", {})),
            model_version=raw.get("model_version"),
            updated=float(raw.get("updated", 0.0)),
            tracks=[VideoTrackRegion.from_dict(t) for t in raw.get("tracks", [])],
        )


@dataclass
class FeedbackState:
    """What ``catch_up`` keeps between calls (so nothing needs re-reading)."""

    byte_offset: int = 0  # how far the event log has been processed
    since_training: int = 0  # annotations created or updated since the last training was queued
    annotations: int = 0  # annotation events processed in all
    tasks: int = 0  # annotated tasks with a record now
    regions: dict[str, int] = field(default_factory=lambda: Comparison().counts())  # kept/removed/changed/added
    shapes: dict[str, int] = field(default_factory=dict)  # annotated regions now, by task type and shape
    unlearnable: int = 0  # annotation events with nothing to learn (choices, a video without tracks, ...)
    error: str | None = None  # why the event at byte_offset could not be processed (retried later)
    rotated_bytes: int = 0  # bytes of the log rotated away: rotated_bytes + byte_offset only ever grows


class FeedbackStore:
    """Per-project prediction log and annotation feedback (see the module docs for the layout)."""

    def __init__(self, folder: Path, events: EventLog, *, match_iou: float = 0.5, max_pixels: int = 100_000_000):
        self.folder = folder
        self.events = events
        self.match_iou = match_iou
        self.max_pixels = max_pixels
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> FeedbackStore:
        model_dir = settings.model_dir
        return cls(model_dir / "feedback", EventLog(model_dir / "events"), match_iou=settings.feedback_iou,
                   max_pixels=settings.max_image_pixels)  # fmt: skip

    # -- predictions ---------------------------------------------------------------------------

    def record_prediction(
        self, pid: str, task_id: int, model_version: str, regions: list[Region],
        tracks: list[VideoTrackRegion] | None = None,
    ) -> None:  # fmt: skip
        """Log what usam predicted for a task: its image regions, or a video's tracks."""
        payload = {"task": task_id, "model_version": model_version, "regions": [asdict(r) for r in regions],
                   "tracks": [asdict(t) for t in tracks or []]}  # fmt: skip
        with atomic_path(self._dir(pid, "predictions") / f"{task_id}.json") as tmp:
            tmp.write_text(json.dumps(payload, separators=(",", ":")))

    def prediction(self, pid: str, task_id: int) -> tuple[str | None, list[Region]]:
        raw = _read_json(self._dir(pid, "predictions") / f"{task_id}.json")
        if raw is None:
            return None, []
        return raw.get("model_version"), [Region.from_dict(r) for r in raw.get("regions", [])]

    def predicted_tracks(self, pid: str, task_id: int) -> list[VideoTrackRegion]:
        """The video tracks usam last posted for a task (none for an image task)."""
        raw = _read_json(self._dir(pid, "predictions") / f"{task_id}.json") or {}
        return [VideoTrackRegion.from_dict(t) for t in raw.get("tracks", [])]

    # -- annotations ---------------------------------------------------------------------------

    def tasks(self, pid: str) -> list[TaskFeedback]:
        """Every annotated task's latest feedback, by task id."""
        folder = self._dir(pid, "tasks", create=False)
        found = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            raw = _read_json(path)
            if raw is not None:
                try:
                    found.append(TaskFeedback.from_dict(raw))
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("skipping unreadable feedback %s: %s", path, exc)
        return sorted(found, key=lambda f: f.task)

    def state(self, pid: str) -> FeedbackState:
        raw = _read_json(self._dir(pid, create=False) / "state.json")
        try:
            return FeedbackState(**raw) if raw else FeedbackState()
        except TypeError:
            return FeedbackState()

    def catch_up(self, pid: str) -> FeedbackState:
        """Process the project's webhook events not processed yet; returns the new state.

        Stops at an event that raises (``state.error`` says why): the next call tries it again,
        so no event is ever skipped. A fully processed, large log is rotated."""
        with self._lock(pid):
            state = self.state(pid)
            state.error = None
            for event, end in self.events.read_from(pid, state.byte_offset):
                try:
                    learnable = self._apply(pid, event, state, state.rotated_bytes + end)
                    if learnable is not None:
                        state.annotations += 1
                        state.since_training += int(learnable)
                        state.unlearnable += int(not learnable)
                except Exception as exc:
                    state.error = f"{type(exc).__name__}: {exc}"[:500]
                    log.exception("project %s: event at byte %d not processed yet", pid, state.byte_offset)
                    break
                state.byte_offset = end
            if state.error is None and self.events.rotate(pid, state.byte_offset):
                state.rotated_bytes += state.byte_offset
                state.byte_offset = 0
            self._save_state(pid, state)
            return state

    def training_queued(self, pid: str) -> None:
        """Reset the count of annotations since the last training."""
        with self._lock(pid):
            state = self.state(pid)
            state.since_training = 0
            self._save_state(pid, state)

    def summary(self, pid: str) -> dict[str, Any]:
        """Counts for /health, from the state file alone (cheap however large the project)."""
        state = self.state(pid)
        summary = {
            "annotated_tasks": state.tasks,
            "regions": dict(state.regions),
            "by_shape": dict(sorted(state.shapes.items())),
            "since_training": state.since_training,
            "not_learnable": state.unlearnable,
        }
        if state.error:
            summary["error"] = f"annotation events wait to be processed: {state.error}"
        return summary

    def _apply(self, pid: str, event: dict[str, Any], state: FeedbackState, end: int) -> bool | None:
        """None: not an annotation; else whether the annotation holds something a head learns from."""
        action = event.get("action")
        if action in ANNOTATION_ACTIONS:
            annotation = event.get("annotation") or {}
            task = event.get("task") or {}
            task_id = task.get("id") if isinstance(task, dict) else task
            task_id = task_id if task_id is not None else annotation.get("task")
            if task_id is None:
                return None
            return self._record_annotation(
                pid, int(task_id), annotation, task if isinstance(task, dict) else {}, state, end
            )
        if action == "ANNOTATIONS_DELETED":
            deleted = {a.get("id") for a in event.get("annotations") or [] if isinstance(a, dict)}
            for annotation_id in deleted:
                owner = self._dir(pid, "annotations") / _safe_name(annotation_id)
                task_id = _read_int(owner)
                if task_id is None:  # recorded by an earlier version, in one index file
                    task_id = (_read_json(self._dir(pid) / "annotations.json") or {}).get(str(annotation_id))
                if task_id is not None:
                    known = _read_json(self._dir(pid, "tasks") / f"{task_id}.json") or {}
                    if known.get("annotation") == annotation_id:
                        self._forget(pid, task_id, state, known, end)
                        log.info("project %s: annotation %s of task %s deleted", pid, annotation_id, task_id)
                owner.unlink(missing_ok=True)
        return None

    def _record_annotation(
        self, pid: str, task_id: int, annotation: dict[str, Any], task: dict[str, Any], state: FeedbackState,
        end: int,
    ) -> bool:  # fmt: skip
        """Record the task's latest annotation; whether it holds something to learn: a region or a
        video track usam reads, or on an image no region at all (every grid point is background);
        not an annotation made only of results usam does not learn from (choices, text, ...), nor a
        video's annotation without a track (no frame to learn from)."""
        path = self._dir(pid, "tasks") / f"{task_id}.json"
        known = _read_json(path) or {}
        self._forget(pid, task_id, state, known, end)
        if annotation.get("was_cancelled"):
            return False  # skipped: teaches nothing
        result = annotation.get("result") or []
        regions = annotation_regions(result, task_id, self.max_pixels)
        tracks = annotation_tracks(result, task_id)
        version, predicted = self.prediction(pid, task_id)
        predicted_tracks = self.predicted_tracks(pid, task_id)
        if result and not regions and not tracks and not predicted and not predicted_tracks:
            return False  # e.g. only choices or text: nothing usam learns from
        comparison = compare(predicted, regions, self.match_iou).merged(
            compare_tracks(predicted_tracks, tracks, self.match_iou)
        )
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        data = data or dict(known.get("data") or {})  # keep what an earlier event said about the task's image
        record = TaskFeedback(task_id, annotation.get("id"), data, regions, comparison, version, time.time(), tracks)
        self._write_json(path, {**asdict(record), "event_end": end})
        state.tasks += 1
        for key, n in comparison.counts().items():
            state.regions[key] = state.regions.get(key, 0) + n
        for kind in [_task_kind(region) for region in regions] + [_track_kind()] * len(tracks):
            state.shapes[kind] = state.shapes.get(kind, 0) + 1
        if annotation.get("id") is not None:  # one small file per annotation: O(1) per event
            with atomic_path(self._dir(pid, "annotations") / _safe_name(annotation["id"])) as tmp:
                tmp.write_text(str(task_id))
        log.info("project %s task %s: feedback %s", pid, task_id, comparison.counts())
        return bool(regions or tracks) or not (predicted_tracks or _has_track(result))

    def _forget(self, pid: str, task_id: int, state: FeedbackState, known: dict[str, Any], end: int) -> None:
        """Drop a task's record (``known``, as read) and take its counts out of the totals.

        A record written by this very event or a later one (``event_end >= end``) was left by a
        catch-up that crashed before saving its state: the totals never counted it."""
        if not known:
            return
        (self._dir(pid, "tasks") / f"{task_id}.json").unlink(missing_ok=True)
        if int(known.get("event_end", 0)) >= end > 0:
            return
        state.tasks = max(0, state.tasks - 1)
        for key, ids in (known.get("comparison") or {}).items():
            state.regions[key] = max(0, state.regions.get(key, 0) - len(ids))
        kinds = [_task_kind(Region.from_dict(raw)) for raw in known.get("regions") or []]
        for kind in kinds + [_track_kind()] * len(known.get("tracks") or []):
            state.shapes[kind] = max(0, state.shapes.get(kind, 0) - 1)

    @staticmethod
    def _write_json(path: Path, payload: Any) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(payload, separators=(",", ":")))

    def _save_state(self, pid: str, state: FeedbackState) -> None:
        self._write_json(self._dir(pid) / "state.json", asdict(state))

    def _dir(self, pid: str, *parts: str, create: bool = True) -> Path:
        folder = self.folder.joinpath(pid, *parts)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _lock(self, pid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(pid, threading.Lock())


def annotation_regions(result: list[Any], task: object = None, max_pixels: int = 100_000_000) -> list[Region]:
    """The image regions of an annotation's result, in every shape (brush, polygon, rectangle,
    ellipse; :func:`~usam_backend.labelstudio.annotations.read_results`), each as the mask it covers
    at the size Label Studio states, with its frame on a frame sequence. A rectangle's mask is its
    interior: training matches SAM's mask of each grid point to it by IoU, so the object inside a
    tight box matches and the background in its corners is ignored. Video tracks are read by
    :func:`annotation_tracks`; other result types are not learned from; unreadable regions, and
    regions stating an image of more than ``max_pixels``, are skipped with a warning."""
    items = []
    for item in result if isinstance(result, list) else []:
        if isinstance(item, dict) and str(item.get("type") or "").lower() == VIDEO_TRACK:
            continue
        height, width = (item.get("original_height"), item.get("original_width")) if isinstance(item, dict) else (0, 0)
        if isinstance(height, int) and isinstance(width, int) and height * width > max_pixels:
            log.warning("task %s: skipping a region drawn on a %sx%s image (over USAM_MAX_IMAGE_PIXELS)",
                        task, width, height)  # fmt: skip
            continue
        items.append(item)
    read = read_results(items, task=task, size=lambda *_: None)
    for error in read.errors:
        log.warning("skipping a region usam cannot learn from: %s", error)
    frames = {str(item.get("id")): item.get("item_index") for item in items if isinstance(item, dict)}
    regions: list[Region] = []
    for found in read.regions:
        frame = frames.get(str(found.id)) if found.id is not None else None
        regions.append(
            Region(
                id=str(found.id if found.id is not None else len(regions)),
                label=found.label,
                control=found.control,
                image=found.image,
                rle=mask_to_rle(found.mask),
                shape=found.shape,
                frame=int(frame) if isinstance(frame, int) and not isinstance(frame, bool) else None,
            )
        )
    return regions


def annotation_tracks(result: list[Any], task: object = None) -> list[VideoTrackRegion]:
    """The ``videorectangle`` tracks of an annotation's result, as stored (keyframes and
    ``framesCount``), each checked to be one Label Studio can draw; unreadable tracks are skipped
    with a warning."""
    items = [
        item for item in (result if isinstance(result, list) else [])
        if isinstance(item, dict) and str(item.get("type") or "").lower() in (VIDEO_TRACK, "labels")
    ]  # fmt: skip
    read = read_results(items, task=task, size=lambda *_: (100, 100), track_frames=())
    for error in read.errors:
        log.warning("skipping a video track usam cannot learn from: %s", error)
    by_id = {str(item.get("id") or ""): item for item in items if item.get("type") == VIDEO_TRACK}
    tracks = []
    for found in read.tracks:
        value = by_id[found.id]["value"]
        count = value.get("framesCount")
        frames_count = int(count) if isinstance(count, int | float) and count > 0 else 0
        tracks.append(VideoTrackRegion(found.id, found.label, found.control, found.video,
                                       list(value["sequence"]), frames_count, found.score))  # fmt: skip
    return tracks


def compare(predicted: list[Region], annotated: list[Region], match_iou: float) -> Comparison:
    """Match predicted to annotated regions: by region id (Label Studio keeps the ids of the
    prediction regions an annotator accepts), then greedily by mask IoU >= ``match_iou``."""
    result = Comparison()
    masks_p = {r.id: _with_box(r.mask()) for r in predicted}
    masks_a = {r.id: _with_box(r.mask()) for r in annotated}
    left_p = {r.id: r for r in predicted}
    left_a = {r.id: r for r in annotated}
    pairs: list[tuple[Region, Region, float]] = []
    for rid in list(left_p):
        if rid in left_a:
            pairs.append((left_p.pop(rid), left_a.pop(rid), _iou(masks_p[rid], masks_a[rid])))
    place = {r.id: (r.image, r.frame) for r in (*predicted, *annotated)}  # only regions on one frame can match
    candidates = sorted(
        ((_iou(masks_p[p], masks_a[a]) if place[p] == place[a] else 0.0, p, a) for p in left_p for a in left_a),
        key=lambda c: -c[0],
    )
    for iou, p, a in candidates:
        if iou >= match_iou and p in left_p and a in left_a:
            pairs.append((left_p.pop(p), left_a.pop(a), iou))
    for pred, ann, iou in pairs:
        if pred.label == ann.label and iou >= SAME_OUTLINE_IOU:
            result.kept.append(pred.id)
        else:
            result.changed.append(
                {"id": pred.id, "label_from": pred.label, "label_to": ann.label, "iou": round(iou, 4)}
            )
    result.removed = list(left_p)
    result.added = list(left_a)
    return result


def compare_tracks(
    predicted: list[VideoTrackRegion], annotated: list[VideoTrackRegion], match_iou: float
) -> Comparison:
    """Match predicted to annotated video tracks: by id, then greedily by :func:`track_iou` >=
    ``match_iou``. A matched track is kept when its label is the same, its boxes are within
    :data:`SAME_OUTLINE_IOU` and it covers the same frames (within the same share); else changed."""
    result = Comparison()
    if not predicted and not annotated:
        return result
    frames = spread_frames([r for track in (*predicted, *annotated) for r in track.frames()], TRACK_COMPARED_FRAMES)
    boxes = {("p", t.id): t.boxes(frames) for t in predicted} | {("a", t.id): t.boxes(frames) for t in annotated}
    left_p = {t.id: t for t in predicted}
    left_a = {t.id: t for t in annotated}
    pairs: list[tuple[VideoTrackRegion, VideoTrackRegion, tuple[float, float]]] = []
    for tid in list(left_p):
        if tid in left_a:
            pairs.append((left_p.pop(tid), left_a.pop(tid), track_iou(boxes[("p", tid)], boxes[("a", tid)])))
    candidates = sorted(
        ((track_iou(boxes[("p", p)], boxes[("a", a)]), p, a) for p in left_p for a in left_a
         if left_p[p].video == left_a[a].video),
        key=lambda c: -c[0][0],
    )  # fmt: skip
    for ious, p, a in candidates:
        if ious[0] >= match_iou and p in left_p and a in left_a:
            pairs.append((left_p.pop(p), left_a.pop(a), ious))
    for pred, ann, (iou, frames_iou) in pairs:
        if pred.label == ann.label and iou >= SAME_OUTLINE_IOU and frames_iou >= SAME_OUTLINE_IOU:
            result.kept.append(pred.id)
        else:
            result.changed.append({"id": pred.id, "label_from": pred.label, "label_to": ann.label,
                                   "iou": round(iou, 4), "frames_iou": round(frames_iou, 4)})  # fmt: skip
    result.removed = list(left_p)
    result.added = list(left_a)
    return result


def track_iou(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> tuple[float, float]:
    """(mean box IoU over the frames both tracks are drawn on, 0 when none; the share of the frames
    either is drawn on that both are: how alike their courses are) of two tracks' boxes by frame."""
    both = sorted(a.keys() & b.keys())
    either = len(a.keys() | b.keys())
    if not both:
        return 0.0, 0.0
    ious = box_ious(np.stack([a[f] for f in both]), np.stack([b[f] for f in both]))
    return float(ious.mean()), len(both) / either


def spread_frames(ranges: list[range], most: int) -> list[int]:
    """Every frame of the ranges' union, or ``most`` of them spread evenly over it."""
    merged: list[list[int]] = []
    for frames in sorted((r for r in ranges if r), key=lambda r: r.start):
        if merged and frames.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], frames.stop)
        else:
            merged.append([frames.start, frames.stop])
    total = sum(stop - start for start, stop in merged)
    if total <= most:
        return [f for start, stop in merged for f in range(start, stop)]
    offsets = np.cumsum([0] + [stop - start for start, stop in merged])
    picked = []
    for position in np.unique(np.linspace(0, total - 1, most).round().astype(np.int64)):
        part = int(np.searchsorted(offsets, position, side="right")) - 1
        picked.append(merged[part][0] + int(position - offsets[part]))
    return picked


def _has_track(result: Any) -> bool:
    return any(isinstance(r, dict) and str(r.get("type") or "").lower() == VIDEO_TRACK for r in result or [])


def _track_kind() -> str:
    return f"video/{VIDEO_TRACK}"


def _task_kind(region: Region) -> str:
    """``image/<shape>`` or ``sequence/<shape>``: the key of /health's per-shape counts."""
    return f"{'sequence' if region.frame is not None else 'image'}/{region.shape}"


def _with_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mask, mask_boxes(mask[None])[0]


def _iou(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    if a[0].shape != b[0].shape:  # drawn at another image size: not the same region
        return 0.0
    return mask_iou(a[0], a[1], b[0], b[1])


def _safe_name(annotation_id: object) -> str:
    """A file name for an annotation id (Label Studio's are integers; anything else is hashed)."""
    text = str(annotation_id)
    return text if text.isdigit() else hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
