"""Video tasks (``<Video>`` + ``<VideoRectangle>``): one labelled box track per object, as jobs.

A video task job downloads the task's video (with Label Studio's token, up to
``USAM_MAX_VIDEO_BYTES``) and splits its frames into chunks of ``USAM_VIDEO_CHUNK``. In each
chunk the project's head segments every ``USAM_VIDEO_STRIDE``-th frame and its regions' boxes
become detections; the detections of all chunks are then linked into tracks by ByteTrack
(:func:`usam_backend.systems.uvosam.track_boxes`) and posted as ``videorectangle`` results: a
keyframe per frame the head saw the object on, ``enabled: false`` where the track pauses or ends
(Label Studio interpolates between keyframes).

On RQ workers a long video's chunks are separate jobs (so one video uses several workers); each
writes its detections under ``USAM_MODEL_DIR/video/`` and the one that completes the set links
them and posts the prediction. Chunks already done are not computed again, so re-running resumes.
Without Redis the task job does every chunk itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from training.progress import Progress
from usam_backend.core.errors import UsamError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.settings import Settings
from usam_backend.core.video import VideoError, probe_video, read_clip
from usam_backend.jobs.policy import video_chunk_jobs
from usam_backend.jobs.preannotate import serving
from usam_backend.jobs.runners import Publish, make_runner
from usam_backend.labelstudio.client import LabelStudioApi, LabelStudioApiError
from usam_backend.labelstudio.config import LabelConfig, ProjectLabel
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.labelstudio.projects import ProjectRecord
from usam_backend.labelstudio.results import prediction, region_id, video_rectangle
from usam_backend.registry import HeadChoice
from usam_backend.sam.shared import compute_lock, shared_engine
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import Track, TrackOptions, detect, track_boxes

log = logging.getLogger("usam.video")


def plan_chunks(frame_count: int, chunk: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) frame ranges of about ``chunk`` frames, each starting on a strided frame."""
    size = max(stride, (chunk // stride) * stride)
    return [(start, min(frame_count, start + size)) for start in range(0, frame_count, size)]


class ChunkStore:
    """A video task's chunk detections on disk (shared by the workers through ``USAM_MODEL_DIR``)."""

    def __init__(self, settings: Settings, project: str, task_id: int, version: str):
        self.folder = settings.model_dir / "video" / project / f"task-{task_id}-{version}"
        self.marker = self.folder.with_name(self.folder.name + ".linking")  # outside the folder clear() removes
        self.stale_after = float(settings.job_timeout)

    def path(self, start: int) -> Path:
        return self.folder / f"chunk-{start:09d}.json"

    def has(self, start: int) -> bool:
        return self.path(start).exists()

    def put(self, start: int, payload: dict[str, Any]) -> None:
        with atomic_path(self.path(start)) as tmp:
            tmp.write_text(json.dumps(payload))

    def load(self, chunks: list[tuple[int, int]]) -> list[dict[str, Any]] | None:
        """Every chunk's detections, or None while some chunk is missing (or the set was just linked)."""
        try:
            return [json.loads(self.path(start).read_text()) for start, _ in chunks]
        except FileNotFoundError:
            return None

    def claim(self) -> bool:
        """True for exactly one caller: the one that links the chunks. A claim older than the job
        timeout (its holder died) is taken over by whoever renames it away first."""
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            pass
        try:
            if time.time() - self.marker.stat().st_mtime <= self.stale_after:
                return False
            os.rename(self.marker, self.marker.with_name(f"{self.marker.name}.stale-{os.getpid()}-{time.time_ns()}"))
        except FileNotFoundError:  # released, or another caller took it over first
            return False
        return self.claim()

    def release(self) -> None:
        self.marker.unlink(missing_ok=True)
        for stale in self.marker.parent.glob(self.marker.name + ".stale-*"):
            stale.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def video_task_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """Pre-annotate one video task (``request["tasks"] == [task id]``): see the module docs.

    Returns counts (``predicted``, ``skipped``, ``failed``) and, when its chunks went to other
    workers, ``chunk_jobs``: their job ids.
    """
    project = str(request["project"])
    task_id = int(request["tasks"][0])
    record, config, choice = serving(settings, project)
    counts: dict[str, Any] = {"predicted": 0, "skipped": 0, "failed": 0, "model_version": choice.version}
    progress = Progress(publish)
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        if choice.version in api.prediction_versions(task_id):
            counts["skipped"] = 1
            return counts
        try:
            task = api.task(task_id)
            raw = _video_bytes(settings, record, config, task, client)
            frame_count = probe_video(raw, max_pixels=settings.max_image_pixels)[0]
            if frame_count > settings.video_max_frames:
                raise UsamError(
                    f"{frame_count:,} frames, more than USAM_VIDEO_MAX_FRAMES={settings.video_max_frames:,}"
                )
            rate = frame_rate(config, task)
        except LabelStudioApiError:
            raise
        except UsamError as exc:
            log.warning("project %s task %s: not pre-annotated: %s", project, task_id, exc)
            counts["failed"] = 1
            counts["error"] = str(exc)
            return counts
        chunks = plan_chunks(frame_count, settings.video_chunk, settings.video_stride)
        runner = make_runner(settings)
        if len(chunks) > 1 and runner.kind == "rq":
            specs = video_chunk_jobs(project, task_id, chunks, version=choice.version)
            for spec in specs:
                runner.submit(spec, force=True)  # a finished chunk re-run only finds its work done
            counts["chunk_jobs"] = [spec.id for spec in specs]
            return counts
        store = ChunkStore(settings, project, task_id, choice.version)
        progress.stage("finding objects", sum(len(range(a, b, settings.video_stride)) for a, b in chunks))
        for start, stop in chunks:
            _detect_chunk(settings, store, raw, config, choice, start, _open_end(chunks, start, stop), rate, progress)
        progress.close()
        if store.claim():
            counts["predicted"] = _link_and_post(settings, api, project, task_id, config, choice, store, chunks)
    return counts


def video_chunk_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """One chunk of a video task (``request``: project, tasks [id], start, stop, chunks, version); the
    chunk that completes the set links every chunk's detections and posts the prediction."""
    project = str(request["project"])
    task_id = int(request["tasks"][0])
    start, stop = int(request["start"]), int(request["stop"])
    chunks = [(int(a), int(b)) for a, b in request["chunks"]]
    record, config, choice = serving(settings, project)
    counts: dict[str, Any] = {"predicted": 0, "skipped": 0, "failed": 0, "model_version": choice.version}
    if request.get("version") not in (None, choice.version):  # a new head since the video was split
        counts["skipped"] = 1
        counts["error"] = f"the project's head changed from {request['version']} to {choice.version}: run it again"
        return counts
    store = ChunkStore(settings, project, task_id, choice.version)
    progress = Progress(publish)
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        if not store.has(start):
            task = api.task(task_id)
            raw = _video_bytes(settings, record, config, task, client)
            progress.stage("finding objects", len(range(start, stop, settings.video_stride)))
            rate = frame_rate(config, task)
            _detect_chunk(settings, store, raw, config, choice, start, _open_end(chunks, start, stop), rate, progress)
            progress.close()
        if store.load(chunks) is not None and store.claim():
            counts["predicted"] = _link_and_post(settings, api, project, task_id, config, choice, store, chunks)
    return counts


def _open_end(chunks: list[tuple[int, int]], start: int, stop: int) -> int | None:
    """The last chunk reads to the real end of the video, whatever the container said its length was."""
    return None if (start, stop) == tuple(chunks[-1]) else stop


def frame_rate(config: LabelConfig, task: dict[str, Any]) -> float:
    """The video's frame rate as Label Studio uses it: the config's ``frameRate``, or the task
    field it names (``frameRate="$fps"``); 24 when that field is missing or not a rate."""
    video = next(iter(config.videos.values()))
    if video.frame_rate_key is None:
        return video.frame_rate
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    try:
        rate = float(data.get(video.frame_rate_key))  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError):
        return 24.0
    return rate if 0 < rate <= 1000 else 24.0


def _video_bytes(
    settings: Settings, record: ProjectRecord, config: LabelConfig, task: dict[str, Any], client: httpx.Client
) -> bytes:
    video = next(iter(config.videos.values()))
    data = task.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(video.key), str):
        raise UsamError(f"task {task.get('id')} has no video URL in '{video.key}'")
    return fetcher_for(settings, record, client, video=True).fetch(data[video.key], int(task["id"]))


def _head_classes(config: LabelConfig, choice: HeadChoice) -> dict[int, ProjectLabel]:
    """Head class index -> the video label it predicts."""
    by_class: dict[int, ProjectLabel] = {}
    for label in config.labels:
        if label.kind == "videorectangle" and label.value in choice.served:
            by_class.setdefault(choice.served[label.value], label)
    return by_class


def _detect_chunk(
    settings: Settings, store: ChunkStore, raw: bytes, config: LabelConfig, choice: HeadChoice, start: int,
    stop: int | None, rate: float, progress: Progress,
) -> None:  # fmt: skip
    if store.has(start):
        progress.advance(len(range(start, stop or start, settings.video_stride)))
        return
    try:
        clip = read_clip(raw, stride=settings.video_stride, start=start, stop=stop,
                         max_frames=settings.video_max_frames, max_pixels=settings.max_image_pixels)  # fmt: skip
    except VideoError:
        if start == 0:
            raise
        store.put(start, {"frames": [], "frame_count": 0})  # the container overstated its length
        return
    by_class = _head_classes(config, choice)
    with compute_lock:
        segmenter = SemanticSegmenter.from_settings(shared_engine(settings), choice.head, settings)
        found = detect(clip.frames, segmenter, classes={choice.head.class_names[i] for i in by_class},
                       progress=progress.advance)  # fmt: skip
    height, width = clip.frames[0].shape[:2]
    frames = []
    for index, detections in zip(clip.indices, found, strict=True):
        boxes, scores, classes = detections if detections is not None else ([], [], [])
        frames.append({"index": index, "boxes": np.asarray(boxes).tolist(), "scores": np.asarray(scores).tolist(),
                       "classes": np.asarray(classes).tolist()})  # fmt: skip
    store.put(start, {"fps": clip.fps, "frame_count": clip.frame_count, "width": width, "height": height,
                      "frame_rate": rate, "frames": frames})  # fmt: skip


def _link_and_post(
    settings: Settings, api: LabelStudioApi, project: str, task_id: int, config: LabelConfig, choice: HeadChoice,
    store: ChunkStore, chunks: list[tuple[int, int]],
) -> int:  # fmt: skip
    """Link the chunks' detections into tracks and post them; 1 if a prediction was posted."""
    try:
        parts = store.load(chunks)
        if parts is None:  # linked by another caller meanwhile
            return 0
        posted = _post_tracks(api, project, task_id, config, choice, parts, settings.video_stride)
    finally:
        store.release()
    store.clear()
    return posted


def _post_tracks(
    api: LabelStudioApi, project: str, task_id: int, config: LabelConfig, choice: HeadChoice,
    parts: list[dict[str, Any]], stride: int,
) -> int:  # fmt: skip
    frames = [f for part in parts for f in part["frames"]]
    detections = [
        (np.asarray(f["boxes"], dtype=np.float64).reshape(-1, 4), np.asarray(f["scores"]), np.asarray(f["classes"]))
        for f in frames
    ]
    indices = [int(f["index"]) for f in frames]
    tracks = track_boxes(detections, frames=indices, min_hits=min(TrackOptions.min_hits, len(indices)))
    clip = {**parts[0], "frame_count": max(int(part["frame_count"]) for part in parts)}
    results = video_results(tracks, config, choice, task_id, stride, clip)
    if choice.version in api.prediction_versions(task_id):
        return 0
    api.create_prediction(project, task_id, prediction(results, choice.version))
    return 1


def video_results(
    tracks: dict[int, Track], config: LabelConfig, choice: HeadChoice, task_id: int, stride: int,
    clip: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """One ``videorectangle`` per track whose class serves a label of the video."""
    by_class = _head_classes(config, choice)
    video = next(iter(config.videos.values()))
    rate = float(clip.get("frame_rate") or video.frame_rate)
    results = []
    for tid, track in sorted(tracks.items()):
        label = by_class.get(track.class_id)
        if label is None:
            continue
        keyframes = {f: track.boxes[f] for f in sorted(track.scores)}
        continues = {f for f in keyframes if any(g in track.boxes for g in range(f + 1, f + stride + 1))}
        rid = region_id(choice.version, task_id, video.name, tid)
        size = (int(clip["width"]), int(clip["height"]))
        region = video_rectangle(keyframes, continues, label, track.score, rid, size=size, fps=float(clip["fps"]),
                                 frame_count=int(clip["frame_count"]), frame_rate=rate)  # fmt: skip
        results.append(region)
    return results
