"""Video tasks (``<Video>`` + ``<VideoRectangle>``): one labelled box track per object, as jobs.

A video task job downloads the task's video once per worker (with Label Studio's token, up to
``USAM_MAX_VIDEO_BYTES``, into a small cache under ``USAM_CACHE_DIR/videos``) and splits its
frames into chunks of ``USAM_VIDEO_CHUNK``. In each chunk the project's head segments every
``USAM_VIDEO_STRIDE``-th frame and the chunk's last frame, and its regions' boxes become
detections; the detections of all chunks are then linked into tracks
(:func:`usam_backend.systems.uvosam.track_boxes`) and posted as ``videorectangle`` results: a
keyframe per frame the head saw the object on, ``enabled: false`` where the track pauses or ends
(Label Studio interpolates between keyframes).

The settings that shape the result (:class:`VideoShape`: stride, chunk size, frame and pixel
limits) travel with the jobs, so every worker computes the same video the same way.

On RQ workers a long video's chunks are separate jobs (so one video uses several workers); each
stores its detections in Redis and the one that completes the set claims the linking (``SET NX
PX`` with an owner token, released by compare-and-delete), links them and posts the prediction:
video work needs no shared filesystem. Without Redis the task job does every chunk itself and
keeps them under ``USAM_MODEL_DIR/video/``. Chunks already done are not computed again, so
re-running resumes. A chunk that fails (a corrupt segment, a variable frame rate mid-file, the
frame limit) fails its job with the reason, and the video is not posted half-tracked.

The compute lock is taken per frame, so a ``/predict`` or a smart-tool click waits for one frame
of a video job at most.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from training.progress import Progress
from usam_backend.core.errors import UsamError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.settings import Settings
from usam_backend.core.video import DEFAULT_FPS, EmptyRange, VideoError, probe_video, read_clip
from usam_backend.jobs.policy import VideoShape, video_chunk_jobs, video_task_jobs
from usam_backend.jobs.preannotate import serving
from usam_backend.jobs.runners import Publish, make_runner
from usam_backend.labelstudio.client import LabelStudioApi
from usam_backend.labelstudio.config import LabelConfig, ProjectLabel
from usam_backend.labelstudio.feedback import FeedbackStore, annotation_tracks
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.labelstudio.projects import ProjectRecord
from usam_backend.labelstudio.results import prediction, region_id, video_rectangle
from usam_backend.registry import HeadChoice
from usam_backend.sam.shared import compute_lock, shared_engine
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import Track, TrackOptions, detect, sampled_frames, track_boxes

log = logging.getLogger("usam.video")

CACHED_VIDEOS = 4
"""Videos a worker keeps on disk (the newest used), so the chunks of one video download it once."""
LINK_CLAIM_SECONDS = 600
"""How long a linking claim lasts: linking and posting take seconds; a linker that died frees it then."""
CHUNK_TTL_SECONDS = 7 * 86400
"""Chunk detections kept in Redis this long (as long as RQ keeps job results)."""


def plan_chunks(frame_count: int, chunk: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) frame ranges of about ``chunk`` frames, each starting on a strided frame."""
    size = max(stride, (chunk // stride) * stride)
    return [(start, min(frame_count, start + size)) for start in range(0, frame_count, size)]


class ChunkStore(Protocol):
    """A video task's chunk detections, and the claim to link them."""

    def has(self, start: int) -> bool: ...
    def put(self, start: int, payload: dict[str, Any]) -> None: ...
    def load(self, chunks: list[tuple[int, int]]) -> list[dict[str, Any]] | None: ...
    def claim(self) -> str | None: ...
    def release(self, token: str) -> None: ...
    def clear(self) -> None: ...


def chunk_store(settings: Settings, project: str, task_id: int, version: str, shape: VideoShape) -> ChunkStore:
    """In Redis with ``REDIS_URL`` (shared by the workers), else on disk for this process."""
    name = f"{project}/task-{task_id}-{version}-{shape.digest()}"
    if settings.redis_url:
        return RedisChunkStore(settings.redis_url, name)
    return FileChunkStore(settings.model_dir / "video" / name)


class RedisChunkStore:
    """Chunks in one Redis hash; the linking claim is a key set with ``NX PX`` and an owner token."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, url: str, name: str):
        from redis import Redis

        self.redis = Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=30.0)
        self.chunks = f"usam:video:{name}:chunks"
        self.lock = f"usam:video:{name}:linking"

    def has(self, start: int) -> bool:
        raw = self.redis.hget(self.chunks, str(start))
        return raw is not None and "error" not in json.loads(raw)

    def put(self, start: int, payload: dict[str, Any]) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.chunks, str(start), json.dumps(payload))
            pipe.expire(self.chunks, CHUNK_TTL_SECONDS)
            pipe.execute()

    def load(self, chunks: list[tuple[int, int]]) -> list[dict[str, Any]] | None:
        raw = self.redis.hmget(self.chunks, [str(start) for start, _ in chunks])
        return None if any(r is None for r in raw) else [json.loads(r) for r in raw]  # type: ignore[arg-type]

    def claim(self) -> str | None:
        token = secrets.token_hex(16)
        return token if self.redis.set(self.lock, token, nx=True, px=LINK_CLAIM_SECONDS * 1000) else None

    def release(self, token: str) -> None:
        self.redis.eval(self._RELEASE, 1, self.lock, token)

    def clear(self) -> None:
        self.redis.delete(self.chunks)


class FileChunkStore:
    """Chunks as files in one folder, for the one process that computes a video without Redis."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.marker = folder.with_name(folder.name + ".linking")  # outside the folder clear() removes

    def path(self, start: int) -> Path:
        return self.folder / f"chunk-{start:09d}.json"

    def has(self, start: int) -> bool:
        try:
            return "error" not in json.loads(self.path(start).read_text())
        except FileNotFoundError:
            return False

    def put(self, start: int, payload: dict[str, Any]) -> None:
        with atomic_path(self.path(start)) as tmp:
            tmp.write_text(json.dumps(payload))

    def load(self, chunks: list[tuple[int, int]]) -> list[dict[str, Any]] | None:
        try:
            return [json.loads(self.path(start).read_text()) for start, _ in chunks]
        except FileNotFoundError:
            return None

    def claim(self) -> str | None:
        """A token for exactly one caller; a claim older than :data:`LINK_CLAIM_SECONDS` (its holder
        died while linking) is removed first."""
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            if time.time() - self.marker.stat().st_mtime > LINK_CLAIM_SECONDS:
                self.marker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        token = secrets.token_hex(16)
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as marker:
            marker.write(token)
        return token

    def release(self, token: str) -> None:
        try:
            if self.marker.read_text() == token:
                self.marker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class VideoJob:
    """What every video job of one task works with."""

    settings: Settings
    project: str
    task_id: int
    record: ProjectRecord
    config: LabelConfig
    choice: HeadChoice
    shape: VideoShape

    @classmethod
    def from_request(cls, settings: Settings, request: dict[str, Any]) -> VideoJob:
        """The job's context, with the head of the version it was submitted under while that head
        is on disk: a new head published meanwhile does not change a video half done."""
        project = str(request["project"])
        version = request.get("version")
        record, config, choice = serving(settings, project, str(version) if version not in (None, "current") else None)
        shape = VideoShape.from_request(request, settings)
        return cls(settings, project, int(request["tasks"][0]), record, config, choice, shape)

    def counts(self) -> dict[str, Any]:
        return {"predicted": 0, "skipped": 0, "failed": 0, "model_version": self.choice.version}

    def store(self) -> ChunkStore:
        return chunk_store(self.settings, self.project, self.task_id, self.choice.version, self.shape)

    def video(self, api: LabelStudioApi, client: httpx.Client) -> tuple[Path, dict[str, Any]]:
        """The task's video on disk (downloaded once per worker) and the task."""
        task = api.task(self.task_id)
        video = next(iter(self.config.videos.values()))
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(video.key), str):
            raise UsamError(f"task {self.task_id} has no video URL in '{video.key}'")
        reference = data[video.key]
        key = f"{self.project}\x1f{self.record.hostname}\x1f{self.task_id}\x1f{reference}"
        folder = self.settings.cache_dir / "videos"
        path = folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".video")
        if path.exists():
            os.utime(path)  # the newest used are kept
            return path, task
        raw = fetcher_for(self.settings, self.record, client, video=True).fetch(reference, self.task_id)
        with atomic_path(path) as tmp:
            tmp.write_bytes(raw)
        _evict(folder, keep=path)
        return path, task


def _evict(folder: Path, keep: Path) -> None:
    """Keep the :data:`CACHED_VIDEOS` most recently used videos (other workers may evict too)."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    videos = sorted((p for p in folder.glob("*.video") if p != keep), key=used, reverse=True)
    for old in videos[CACHED_VIDEOS - 1 :]:
        old.unlink(missing_ok=True)


def video_task_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """Pre-annotate one video task (``request["tasks"] == [task id]``): see the module docs.

    Returns counts (``predicted``, ``skipped``) and, when its chunks went to other workers,
    ``chunk_jobs``: their job ids.

    Raises:
        UsamError: the video cannot be used (unreadable, too long, a chunk failed): the job fails
            with the reason, and is tried again after ``RETRY_FAILED_AFTER``.
    """
    job = VideoJob.from_request(settings, request)
    counts = job.counts()
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, job.record, client)
        if job.choice.version in api.prediction_versions(job.task_id):
            counts["skipped"] = 1
            return counts
        source, task = job.video(api, client)
        frame_count = probe_video(source, max_pixels=job.shape.max_pixels)[0]
        if frame_count > job.shape.max_frames:
            raise UsamError(
                f"video task {job.task_id}: {frame_count:,} frames, more than USAM_VIDEO_MAX_FRAMES="
                f"{job.shape.max_frames:,}"
            )
        chunks = plan_chunks(frame_count, job.shape.chunk, job.shape.stride)
        runner = make_runner(settings)
        if len(chunks) > 1 and runner.kind == "rq":
            specs = video_chunk_jobs(job.project, job.task_id, chunks, version=job.choice.version, shape=job.shape)
            for spec in specs:
                runner.submit(spec, force=True)  # a finished chunk re-run only finds its work done
            counts["chunk_jobs"] = [spec.id for spec in specs]
            return counts
        store = job.store()
        progress = Progress(publish)
        progress.stage("finding objects", sum(len(sampled_frames(a, b, job.shape.stride)) for a, b in chunks))
        for start, stop in chunks:
            _detect_chunk(job, store, source, start, stop, last=(start, stop) == chunks[-1], rate=frame_rate(
                job.config, task), progress=progress)  # fmt: skip
        progress.close()
        counts.update(_link_and_post(job, api, store, chunks))
    return counts


def video_chunk_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """One chunk of a video task (``request``: project, tasks [id], start, stop, chunks, version,
    shape); the chunk that completes the set links every chunk's detections and posts the prediction."""
    job = VideoJob.from_request(settings, request)
    start, stop = int(request["start"]), int(request["stop"])
    chunks = [(int(a), int(b)) for a, b in request["chunks"]]
    counts = job.counts()
    if request.get("version") not in (None, job.choice.version):  # its head was removed since the video was split
        return _restart(settings, job, str(request["version"]), counts)
    store = job.store()
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, job.record, client)
        if not store.has(start):
            source, task = job.video(api, client)
            progress = Progress(publish)
            progress.stage("finding objects", len(sampled_frames(start, stop, job.shape.stride)))
            _detect_chunk(job, store, source, start, stop, last=(start, stop) == chunks[-1],
                          rate=frame_rate(job.config, task), progress=progress)  # fmt: skip
            progress.close()
        if store.load(chunks) is not None:
            counts.update(_link_and_post(job, api, store, chunks))
    return counts


def _restart(settings: Settings, job: VideoJob, old: str, counts: dict[str, Any]) -> dict[str, Any]:
    """The one place a video's chunk set restarts: the head of version ``old`` that the set was
    split under is no longer on disk, so the whole video is submitted again under the serving head
    (its chunks already computed under ``old`` are not mixed in: the chunk store is per version)."""
    log.warning("video task %s of project %s: the head %s its chunks were started under is gone; restarting the "
                "video under %s", job.task_id, job.project, old, job.choice.version)  # fmt: skip
    (spec,) = video_task_jobs(
        job.project, [job.task_id], trigger="restart", version=job.choice.version, shape=job.shape
    )
    make_runner(settings).submit(spec)
    counts["skipped"] = 1
    counts["restarted"] = {"from": old, "to": job.choice.version, "job": spec.id}
    return counts


def frame_rate(config: LabelConfig, task: dict[str, Any]) -> float:
    """The video's frame rate as Label Studio uses it: the config's ``frameRate``, or the task
    field it names (``frameRate="$fps"``); Label Studio's default when that field is missing or not a rate."""
    video = next(iter(config.videos.values()))
    if video.frame_rate_key is None:
        return video.frame_rate
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    try:
        rate = float(data.get(video.frame_rate_key))  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError):
        return DEFAULT_FPS
    return rate if 0 < rate <= 1000 else DEFAULT_FPS


def _head_classes(config: LabelConfig, choice: HeadChoice) -> dict[int, ProjectLabel]:
    """Head class index -> the video label it predicts."""
    by_class: dict[int, ProjectLabel] = {}
    for label in config.labels:
        if label.kind == "videorectangle" and label.value in choice.served:
            by_class.setdefault(choice.served[label.value], label)
    return by_class


def _detect_chunk(
    job: VideoJob, store: ChunkStore, source: Path, start: int, stop: int, *, last: bool, rate: float,
    progress: Progress,
) -> None:  # fmt: skip
    """Detect the objects of frames [start, stop) (the last chunk: to the video's real end) and store them.

    Raises:
        UsamError: the chunk cannot be read; the reason is stored for the linker too.
    """
    shape = job.shape
    if store.has(start):
        progress.advance(len(sampled_frames(start, stop, shape.stride)))
        return
    try:  # the last chunk reads to the real end, whatever the container said its length was
        clip = read_clip(source, stride=shape.stride, start=start, stop=None if last else stop, keep_last=True,
                         max_frames=shape.max_frames, max_pixels=shape.max_pixels,
                         max_source_frames=shape.max_frames - start if last else stop - start)  # fmt: skip
    except EmptyRange:  # the container overstated its length: nothing from here on
        store.put(start, {"frames": [], "frame_count": start})
        return
    except VideoError as exc:
        reason = f"frames {start}-{stop - 1} of video task {job.task_id}: {exc}"
        store.put(start, {"error": reason})
        raise UsamError(reason) from None
    by_class = _head_classes(job.config, job.choice)
    segmenter = SemanticSegmenter.from_settings(shared_engine(job.settings), job.choice.head, job.settings)
    found = detect(clip.frames, segmenter, classes={job.choice.head.class_names[i] for i in by_class},
                   progress=progress.advance, lock=compute_lock)  # fmt: skip
    height, width = clip.frames[0].shape[:2]
    frames = []
    for index, detections in zip(clip.indices, found, strict=True):
        boxes, scores, classes = detections if detections is not None else ([], [], [])
        frames.append({"index": index, "boxes": np.asarray(boxes).tolist(), "scores": np.asarray(scores).tolist(),
                       "classes": np.asarray(classes).tolist()})  # fmt: skip
    store.put(start, {"fps": clip.fps, "frame_count": clip.frame_count, "width": width, "height": height,
                      "frame_rate": rate, "frames": frames})  # fmt: skip


def _link_and_post(
    job: VideoJob, api: LabelStudioApi, store: ChunkStore, chunks: list[tuple[int, int]]
) -> dict[str, Any]:
    """Link the chunks' detections into tracks and post them, if this caller gets the claim.

    Returns:
        ``predicted`` 1 when this caller posted the prediction, or ``linking``: why it did not.

    Raises:
        UsamError: a chunk failed: nothing is posted, and the reason says which chunk and why.
    """
    token = store.claim()
    if token is None:
        return {"linking": "another job holds the claim to link this video's chunks and post its prediction"}
    try:
        parts = store.load(chunks)
        if parts is None:  # linked by another caller meanwhile
            return {"linking": "another job linked this video's chunks"}
        errors = [part["error"] for part in parts if "error" in part]
        if errors:
            raise UsamError(f"video task {job.task_id} was not posted: {'; '.join(errors)}")
        parts = [part for part in parts if part.get("frames")]
        if not parts:
            raise UsamError(f"video task {job.task_id}: no frame could be read")
        posted = _post_tracks(job, api, parts)
        store.clear()
    finally:
        store.release(token)
    return {"predicted": posted}


def _post_tracks(job: VideoJob, api: LabelStudioApi, parts: list[dict[str, Any]]) -> int:
    frames = [f for part in parts for f in part["frames"]]
    detections = [
        (np.asarray(f["boxes"], dtype=np.float64).reshape(-1, 4), np.asarray(f["scores"]), np.asarray(f["classes"]))
        for f in frames
    ]
    indices = [int(f["index"]) for f in frames]
    tracks = track_boxes(detections, frames=indices, min_hits=min(TrackOptions.min_hits, len(indices)))
    clip = {**parts[0], "frame_count": max(int(part["frame_count"]) for part in parts)}
    results = video_results(tracks, job.config, job.choice, job.task_id, job.shape.stride, clip)
    if job.choice.version in api.prediction_versions(job.task_id):
        return 0
    api.create_prediction(job.project, job.task_id, prediction(results, job.choice.version))
    try:  # what annotators do with these tracks is feedback (labelstudio.feedback.compare_tracks)
        FeedbackStore.for_settings(job.settings).record_prediction(
            job.project, job.task_id, job.choice.version, [], tracks=annotation_tracks(results, job.task_id)
        )
    except OSError as exc:
        log.warning("video task %s: prediction not logged for feedback: %s", job.task_id, exc)
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
