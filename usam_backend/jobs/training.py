"""Training jobs: a label set (and a project's annotations) in, a published head out.

Plain top-level functions taking plain data, as runners call them: ``(settings, request,
publish=...)``. ``request`` carries the labels, the project id, the trigger and the
:class:`~training.recipe.Recipe`; ``settings`` are the running process's own (paths, device,
credentials). The worker trains exactly the recipe and refuses one made for other SAM weights.
The stages are :mod:`training.pipeline`'s; this module adds what only a server-side job knows:
the project's annotated tasks (fetched from Label Studio) and publishing into the registry.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from training.feedback import InstanceCache, Instances, box_masks, point_labels
from training.pipeline import Trained, train_labels
from training.progress import Progress
from training.recipe import Recipe
from training.sources.synthetic import release_pipelines
from usam_backend.core.errors import DataError, UsamError
from usam_backend.core.images import load_image
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Region
from usam_backend.core.settings import Settings
from usam_backend.core.video import VideoError, probe_video, read_clip
from usam_backend.jobs.runners import Publish
from usam_backend.jobs.video import frame_rate
from usam_backend.labelstudio.config import LabelConfig, parse_label_config
from usam_backend.labelstudio.feedback import FeedbackStore, TaskFeedback, VideoTrackRegion, spread_frames
from usam_backend.labelstudio.media import TaskImageFetcher, fetcher_for
from usam_backend.labelstudio.projects import ProjectStore
from usam_backend.registry import HeadRegistry, model_version
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.shared import compute_lock, shared_engine

log = logging.getLogger("usam.jobs")


def train_labels_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """A head on class images of ``request["labels"]``, published to ``USAM_MODEL_DIR/heads/``."""
    recipe, settings, engine = _prepare(settings, request)
    progress = Progress(publish)
    try:
        trained = train_labels(
            settings, recipe, list(request["labels"]), engine, settings.model_dir / "heads", progress=progress,
            lock=compute_lock, **_registry(request, "labels"),
        )  # fmt: skip
    finally:
        release_pipelines()
    return _published(trained, engine)


def train_feedback_job(
    settings: Settings, request: dict[str, Any], *, publish: Publish | None = None
) -> dict[str, Any]:
    """A project's head: its labels' class images (MIL) plus the points of its annotated tasks
    (:mod:`training.feedback`), calibrated on those points. It serves that project only."""
    pid = request.get("project")
    labels = list(dict.fromkeys(request.get("labels") or []))
    if not pid or not labels:
        raise DataError("a feedback training job needs a project and its labels")
    recipe, settings, engine = _prepare(settings, request)
    tasks = FeedbackStore.for_settings(settings).tasks(pid)  # the server recorded them before queueing
    if not tasks:
        raise DataError(f"project {pid} has no annotated task to learn from (annotations deleted?)")
    progress = Progress(publish)
    progress.stage("annotated tasks", len(tasks))
    fit_tasks, held_out = split_for_calibration(tasks)
    instances, used, problems = annotated_instances(settings, pid, fit_tasks, labels, engine, progress)
    calibration, _, held_problems = annotated_instances(settings, pid, held_out, labels, engine, progress)
    feedback = {"project": pid, "annotated_tasks": used, "tasks_not_used": problems + held_problems,
                "instances": instances.counts(labels), "calibration_tasks": [t.task for t in held_out]}  # fmt: skip
    try:
        trained = train_labels(
            settings, recipe, labels, engine, settings.model_dir / "heads", progress=progress, instances=instances,
            feedback=feedback, calibration=calibration if held_out else None, lock=compute_lock,
            **_registry(request, "feedback"),
        )  # fmt: skip
    finally:
        release_pipelines()
    result = _published(trained, engine)
    result["feedback"] = trained.head.info["feedback"]
    result["pruned"] = [path.name for path in prune_project_heads(settings, pid, trained.path)]
    return result


def prune_project_heads(settings: Settings, pid: str, newest: Path) -> list[Path]:
    """Keep the project's ``USAM_KEEP_PROJECT_HEADS`` newest heads, and the one serving it."""
    registry = HeadRegistry(settings.model_dir / "heads", settings.sam_type)
    protect = {newest}
    record = ProjectStore(settings.model_dir / "projects").get(pid)
    if record is not None:
        choice = registry.choose(parse_label_config(record.label_config).labels, pid)
        if choice is not None:
            protect.add(choice.path)
    return registry.prune(pid, settings.keep_project_heads, protect)


TRACK_FRAMES = 8
"""A video track teaches on at most this many of its frames, spread evenly over the frames it is drawn on."""

CALIBRATION_SHARE = 5
"""Every 5th annotated task (at least 4 needed) is held out of training to calibrate the head on."""


def split_for_calibration(tasks: list[TaskFeedback]) -> tuple[list[TaskFeedback], list[TaskFeedback]]:
    """(tasks to train on, whole tasks held out for calibration); with fewer than 4 annotated
    tasks, all train and the head stays uncalibrated (a temperature fitted on the points it
    learned from would only make it more confident)."""
    if len(tasks) < 4:
        return tasks, []
    held = [t for i, t in enumerate(tasks) if i % CALIBRATION_SHARE == CALIBRATION_SHARE - 1] or tasks[-1:]
    return [t for t in tasks if t not in held], held


def annotated_instances(
    settings: Settings, pid: str, tasks: list[TaskFeedback], labels: list[str], engine: SamEngine,
    progress: Progress,
) -> tuple[Instances, int, list[dict[str, Any]]]:  # fmt: skip
    """Labelled grid points of every annotated task whose image can be fetched; the project
    record (label config, Label Studio's address and token) is read fresh from disk."""
    record = ProjectStore(settings.model_dir / "projects").get(pid)
    if record is None:
        raise DataError(f"project {pid} is unknown to this worker: is USAM_MODEL_DIR shared with the server?")
    config = parse_label_config(record.label_config)
    label_index = {label: i for i, label in enumerate(labels)}
    cache = InstanceCache(settings.cache_dir / "feedback", engine.sam.fingerprint, settings.points,
                          settings.feedback_iou)  # fmt: skip
    parts: list[Instances] = []
    problems: list[dict[str, Any]] = []
    used = 0
    with httpx.Client(follow_redirects=False) as client:
        fetcher = fetcher_for(settings, record, client)
        videos = fetcher_for(settings, record, client, video=True)
        for task in tasks:
            try:
                for image_name, field_ in config.images.items():
                    if field_.key not in task.data:
                        raise DataError(f"task {task.task} has no '{field_.key}' in its data")
                    for ref, regions in _annotated_images(task, image_name, field_.sequence, field_.key,
                                                          settings.sequence_max_frames):  # fmt: skip
                        raw = fetcher.fetch(ref, task.task)
                        key = cache.key(hashlib.sha256(raw).hexdigest(), regions)
                        found = cache.get(key)
                        if found is None:
                            image = load_image(raw, max_pixels=settings.max_image_pixels)
                            with compute_lock:
                                found = point_labels(engine, image, regions, label_index, points=settings.points,
                                                     match_iou=settings.feedback_iou)  # fmt: skip
                            cache.put(key, *found)
                        parts.append(Instances.learned(*found))
                parts += _track_instances(settings, task, config, videos, cache, engine, label_index)
                used += 1
            except UsamError as exc:
                log.warning("project %s task %s: not learned from: %s", pid, task.task, exc)
                problems.append({"task": task.task, "reason": str(exc)})
            progress.advance()
    return Instances.concat(parts, engine.embedding_dim), used, problems


def _track_instances(
    settings: Settings, task: TaskFeedback, config: LabelConfig, fetcher: TaskImageFetcher, cache: InstanceCache,
    engine: SamEngine, label_index: dict[str, int],
) -> list[Instances]:  # fmt: skip
    """Labelled grid points of a video task's annotated tracks: each track on at most
    :data:`TRACK_FRAMES` of its frames (:func:`track_frames`); on each such frame, every track drawn
    there stands for the mask its box prompts (:func:`training.feedback.box_masks`) and the frame's
    points are labelled against them as an image's regions are. The video is fetched once through
    the guarded fetcher; each frame is decoded alone (a seek, never the whole video), embedded once,
    and its instances cached by video content, frame and boxes."""
    parts: list[Instances] = []
    for name, video in config.videos.items():
        tracks = [t for t in task.tracks if t.video == name]
        if not tracks:
            continue
        if video.key not in task.data:
            raise DataError(f"task {task.task} has no '{video.key}' in its data")
        raw = fetcher.fetch(task.data[video.key], task.task)
        digest = hashlib.sha256(raw).hexdigest()
        try:
            frame_count, fps, width, height = probe_video(raw, max_pixels=settings.max_image_pixels)
        except VideoError as exc:
            raise DataError(f"task {task.task}: {exc}") from None
        rate = frame_rate(config, {"data": task.data})
        frames = track_frames(tracks)
        boxes = {t.id: t.boxes(frames, size=(height, width)) for t in tracks}
        for frame in frames:  # Label Studio's 1-based frame -> the decoded video's 0-based index
            drawn = [(t, boxes[t.id][frame]) for t in tracks if frame in boxes[t.id]]
            index = min(frame_count - 1, round((frame - 1) * fps / rate))
            key = cache.content_key(f"{digest}:{index}", [[t.label, b.round(2).tolist()] for t, b in drawn])
            found = cache.get(key)
            if found is None:
                try:
                    image = read_clip(raw, start=index, stop=index + 1, max_frames=1,
                                      max_pixels=settings.max_image_pixels).frames[0]  # fmt: skip
                except VideoError as exc:
                    raise DataError(f"task {task.task}, frame {frame}: {exc}") from None
                with compute_lock:
                    masks = box_masks(engine, image, np.stack([b for _, b in drawn]))
                    regions = [Region(t.id, t.label, t.control, name, mask_to_rle(m), shape="rectangle")
                               for (t, _), m in zip(drawn, masks, strict=True)]  # fmt: skip
                    found = point_labels(engine, image, regions, label_index, points=settings.points,
                                         match_iou=settings.feedback_iou)  # fmt: skip
                cache.put(key, *found)
            parts.append(Instances.learned(*found))
    return parts


def track_frames(tracks: list[VideoTrackRegion], most: int = TRACK_FRAMES) -> list[int]:
    """The frames (1-based) a video task's tracks teach on: for each track, ``most`` of the frames
    it is drawn on, spread evenly from its first to its last; their union, in order."""
    return sorted({frame for track in tracks for frame in spread_frames(track.frames(), most)})


def _annotated_images(
    task: TaskFeedback, image_name: str, sequence: bool, key: str, max_frames: int
) -> list[tuple[Any, list[Region]]]:  # fmt: skip
    """(image reference, its regions) to learn from: a single image with all its regions (none:
    every point is background); of a frame sequence, each frame that has regions (regions of
    every shape, on their ``item_index`` frame), at most ``max_frames`` of them."""
    regions = [r for r in task.regions if r.image == image_name]
    if not sequence:
        return [(task.data[key], regions)]
    refs = task.data[key]
    if not isinstance(refs, list):
        raise DataError(f"task {task.task}: '{key}' is not a list of frames")
    frames = sorted({r.frame or 0 for r in regions})[:max_frames]
    if any(frame >= len(refs) for frame in frames):
        raise DataError(f"task {task.task}: a region is on frame {frames[-1]} of a {len(refs)}-frame sequence")
    return [(refs[frame], [r for r in regions if (r.frame or 0) == frame]) for frame in frames]


def _prepare(settings: Settings, request: dict[str, Any]) -> tuple[Recipe, Settings, SamEngine]:
    """The request's recipe applied to this process's settings, and the engine, checked to run
    the SAM weights the recipe was written for (before and after loading them)."""
    recipe = Recipe.from_dict(dict(request.get("recipe") or {}))
    recipe.check_sam_type(settings.sam_type)
    settings = recipe.apply(settings)
    engine = shared_engine(settings)
    recipe.check_weights(engine.sam.fingerprint)
    return recipe, settings, engine


def _registry(request: dict[str, Any], kind: str) -> dict[str, Any]:
    return {"project": request.get("project"), "trigger": request.get("trigger", "manual"), "kind": kind}


def _published(trained: Trained, engine: SamEngine) -> dict[str, Any]:
    head = trained.head
    version = model_version(head, engine.sam.sam_type)
    log.info("published %s (%s) to %s", version, ", ".join(head.class_names), trained.path)
    return {
        "version": version,
        "file": trained.path.name,
        "labels": list(head.class_names),
        "stage_seconds": trained.stage_seconds,
        "metrics": trained.metrics,
    }
