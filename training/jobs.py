"""The training job: a label set in, a published head out.

Stages, each leaving files on disk that a re-run reuses:

1. class images per label, in the shared content-addressed store (``class_store.py``);
2. SAM embeddings per image, keyed by image hash, SAM weights and grid (``embeddings.py``);
3. teacher and student training;
4. validation on held-out class images;
5. publish: the head, which is its own registry entry (labels, data sources, metrics, stage
   timings), renamed into ``USAM_MODEL_DIR/heads/`` in one atomic step.

A job killed anywhere leaves no head behind and the registry unchanged; run again, it resumes
after the last image it stored or embedded. :func:`run_job` is the RQ entry point: a plain
importable function taking plain data.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.embeddings import BagStore, EmbeddedImages, embed_files
from training.feedback import Instances
from training.head import Head
from training.pipeline import Fit, describe_head, fit_heads
from training.progress import Progress, Publish
from training.sources import ClassSource, make_source, resolve_source_name
from usam_backend.errors import DataError, UsamError
from usam_backend.feedback import FeedbackStore, TaskFeedback
from usam_backend.label_config import normalise
from usam_backend.registry import model_version
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.shared import compute_lock, shared_engine
from usam_backend.settings import Settings, get_settings

log = logging.getLogger("usam.jobs")

HEARTBEAT_SECONDS = 15.0

NEGATIVE_QUERIES = ("landscape", "empty room", "street")
"""With one label, MIL needs images without it: generic scenes from the same source (a folder
source uses USAM_DATA_DIR/_background instead)."""


@dataclass(frozen=True)
class TrainRequest:
    """What to train. ``kind``: ``labels`` (class images only; shared by every project with these
    labels) or ``feedback`` (class images plus the project's annotations; that project only)."""

    labels: list[str]
    project: str | None = None
    trigger: str = "manual"
    kind: str = "labels"
    extra: dict[str, Any] = field(default_factory=dict)


def job_id(settings: Settings, labels: list[str], *, cuda: bool, nonce: str = "") -> str:
    """The same label set under the same data and model settings is the same job (idempotent)."""
    source = resolve_source_name(settings, cuda)
    parts = sorted({normalise(label) for label in labels})
    shaping = [*parts, source, settings.sam_type, str(settings.points), str(settings.seed), nonce]
    return "usam-train-" + hashlib.sha256("\x1f".join(shaping).encode()).hexdigest()[:16]


def feedback_job_id(settings: Settings, project: str, labels: list[str], tasks: list[TaskFeedback], *,
                    cuda: bool) -> str:  # fmt: skip
    """The same annotations of a project, for the same labels and settings, are the same job."""
    digest = hashlib.sha256("\x1f".join(t.digest() for t in tasks).encode()).hexdigest()[:16]
    return job_id(settings, labels, cuda=cuda, nonce=f"feedback/{project}/{digest}").replace("-train-", "-feedback-")


def run_job(request: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point: settings from this worker's environment; progress and a heartbeat go into
    the job's meta (the heartbeat tells the backend a worker is still on it)."""
    from rq import get_current_job

    job = get_current_job()
    lock = threading.Lock()
    stop = threading.Event()

    def save(**values: Any) -> None:
        if job is not None:
            with lock:
                job.meta.update(values, heartbeat=time.time())
                job.save_meta()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            save()

    save()
    threading.Thread(target=beat, name="usam-heartbeat", daemon=True).start()
    try:
        return execute(get_settings(), request, publish=lambda snapshot: save(progress=snapshot))
    finally:
        stop.set()


def execute(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """Run any usam job (both runners call this): training (``kind`` ``labels`` or ``feedback``)
    or a chunk of batch pre-annotation (``preannotate``)."""
    if request.get("kind") == "preannotate":
        from usam_backend.preannotate import preannotate_chunk

        tasks = [int(t) for t in (request.get("extra") or {}).get("tasks", [])]
        progress = Progress(publish)
        progress.stage("pre-annotating", len(tasks))
        result = preannotate_chunk(settings, str(request["project"]), tasks, progress)
        progress.close()
        return result
    train = TrainRequest(**request)
    if train.kind == "feedback":
        return train_feedback(settings, train, publish=publish)
    return train_labels(settings, train, publish=publish)


def train_labels(
    settings: Settings, request: TrainRequest, *, publish: Publish | None = None, engine: SamEngine | None = None
) -> dict[str, Any]:
    """Run the five stages; returns what was published and how long each stage took."""
    labels = list(dict.fromkeys(request.labels))
    if not labels:
        raise DataError("a training job needs at least one label")
    progress = Progress(publish)
    seconds: dict[str, float] = {}
    engine = engine or shared_engine(settings)
    data = _class_data(settings, labels, engine, progress, seconds)
    started = time.perf_counter()
    progress.stage("training")
    fit = fit_heads(data.per_class, data.negatives, seed=settings.seed, epochs=settings.train_epochs)
    seconds["training_and_validation"] = time.perf_counter() - started
    return _publish(settings, request, labels, data, fit, engine, progress, seconds)


def train_feedback(
    settings: Settings, request: TrainRequest, *, publish: Publish | None = None, engine: SamEngine | None = None
) -> dict[str, Any]:
    """A project's head: its labels' class images (MIL) plus the points of its annotated tasks
    (:mod:`training.feedback`), calibrated on those points. It serves that project only."""
    from training.calibration import calibrate

    pid = request.project
    labels = list(dict.fromkeys(request.labels))
    if not pid or not labels:
        raise DataError("a feedback training job needs a project and its labels")
    progress = Progress(publish)
    seconds: dict[str, float] = {}
    engine = engine or shared_engine(settings)
    tasks = FeedbackStore.for_settings(settings).tasks(pid)  # the backend recorded them before queueing
    if not tasks:
        raise DataError(f"project {pid} has no annotated task to learn from (annotations deleted?)")
    data = _class_data(settings, labels, engine, progress, seconds, optional=True)

    started = time.perf_counter()
    progress.stage("annotated tasks", len(tasks))
    instances, used, problems = _feedback_instances(settings, pid, tasks, labels, engine, progress)
    seconds["annotated_tasks"] = time.perf_counter() - started
    annotated = set(instances.counts(labels))
    unlearnable = {label: reason for label, reason in data.missing.items() if label not in annotated}
    if len(data.missing) == len(labels):
        raise DataError(f"no class images for any label ({'; '.join(data.missing.values())})")
    if unlearnable:
        raise DataError(
            "no class images and no annotated region for "
            + "; ".join(f"{label!r} ({reason})" for label, reason in unlearnable.items())
        )

    started = time.perf_counter()
    progress.stage("training")
    extra: dict[str, Any] = {}
    if len(instances.y):
        extra = {"instances": instances.x, "instance_targets": instances.y}
    fit = fit_heads(data.per_class, data.negatives, seed=settings.seed, epochs=settings.train_epochs, **extra)
    calibration = calibrate(fit.heads.final, instances.x, instances.y) if len(instances.y) else None
    seconds["training_and_validation"] = time.perf_counter() - started
    fit.heads.final.info["feedback"] = {
        "project": pid,
        "annotated_tasks": used,
        "tasks_not_used": problems,
        "instances": instances.counts(labels),
        "calibration": calibration,
    }
    return _publish(settings, request, labels, data, fit, engine, progress, seconds)


@dataclass
class _ClassData:
    source: ClassSource
    per_class: dict[str, EmbeddedImages]
    negatives: EmbeddedImages | None
    missing: dict[str, str] = field(default_factory=dict)  # label -> why it has no class images


def _class_data(
    settings: Settings, labels: list[str], engine: SamEngine, progress: Progress, seconds: dict[str, float], *,
    optional: bool = False,
) -> _ClassData:  # fmt: skip
    """Stages 1 and 2: class images, then their point embeddings (both reused across jobs).

    ``optional``: a label whose class images cannot be had is recorded in ``missing`` instead of
    failing the job (a feedback job may learn it from annotations alone)."""
    cuda = engine.device.type == "cuda"
    source = make_source(settings, cuda=cuda)
    count = settings.images_per_class or source.default_count()
    log.info("training %s from %s images (%s per class)", labels, source.name, count or "all")

    negative_queries = _negative_queries(source.name) if len(labels) == 1 else ()
    started = time.perf_counter()
    progress.stage("class images", None if count is None else count * (len(labels) + len(negative_queries)))
    files: dict[str, list[Path]] = {}
    missing: dict[str, str] = {}
    for label in labels:
        try:
            files[label] = source.collect(label, count, progress)
        except DataError as exc:
            if not optional:
                raise
            files[label], missing[label] = [], str(exc)
            log.warning("no class images for %r: %s", label, exc)
    negative_files: list[Path] = []
    for query in negative_queries:
        try:
            negative_files += source.collect(query, _share(count, negative_queries), progress)
        except DataError as exc:
            if not optional:
                raise
            log.warning("no negative images (%s): %s", query, exc)
    seconds["class_images"] = time.perf_counter() - started

    started = time.perf_counter()
    progress.stage("embeddings", sum(len(paths) for paths in files.values()) + len(negative_files))
    store = BagStore(settings.cache_dir / "bags", engine.sam.fingerprint, settings.points)
    per_class = {label: _embed(engine, paths, settings, store, progress) for label, paths in files.items()}
    negatives = _embed(engine, negative_files, settings, store, progress) if negative_files else None
    seconds["embeddings"] = time.perf_counter() - started
    if not optional:
        _check_usable(per_class)
    for label, embedded in per_class.items():
        if len(embedded.files) == 0 and label not in missing:
            missing[label] = "no readable class image"
    return _ClassData(source, per_class, negatives, missing)


def _feedback_instances(
    settings: Settings, pid: str, tasks: list[TaskFeedback], labels: list[str], engine: SamEngine,
    progress: Progress,
) -> tuple[Instances, int, list[dict[str, Any]]]:  # fmt: skip
    """Labelled grid points of every annotated task whose image can be fetched."""
    import httpx

    from training.feedback import IGNORE, InstanceCache, point_labels
    from usam_backend.images import load_image
    from usam_backend.label_config import parse_label_config
    from usam_backend.projects import ProjectStore
    from usam_backend.task_images import fetcher_for

    record = ProjectStore(settings.model_dir / "projects").get(pid)
    if record is None:
        raise DataError(f"project {pid} is unknown to this worker: is USAM_MODEL_DIR shared with the backend?")
    config = parse_label_config(record.label_config)
    label_index = {label: i for i, label in enumerate(labels)}
    cache = InstanceCache(settings.cache_dir / "feedback", engine.sam.fingerprint, settings.points,
                          settings.feedback_iou)  # fmt: skip
    parts: list[Instances] = []
    problems: list[dict[str, Any]] = []
    used = 0
    with httpx.Client(follow_redirects=False) as client:
        fetcher = fetcher_for(settings, record.hostname, record.access_token, client)
        for task in tasks:
            try:
                for image_name, field_ in config.images.items():
                    regions = [r for r in task.regions if r.image == image_name]
                    if field_.key not in task.data:
                        raise DataError(f"task {task.task} has no '{field_.key}' in its data")
                    raw = fetcher.fetch(task.data[field_.key], task.task)
                    key = cache.key(hashlib.sha256(raw).hexdigest(), regions)
                    found = cache.get(key)
                    if found is None:
                        image = load_image(raw, max_pixels=settings.max_image_pixels)
                        with compute_lock:
                            found = point_labels(engine, image, regions, label_index, points=settings.points,
                                                 match_iou=settings.feedback_iou)  # fmt: skip
                        cache.put(key, *found)
                    x, y = found
                    keep = y != IGNORE
                    parts.append(Instances(x[keep], y[keep]))
                used += 1
            except UsamError as exc:
                log.warning("project %s task %s: not learned from: %s", pid, task.task, exc)
                problems.append({"task": task.task, "reason": str(exc)})
            progress.advance()
    return Instances.concat(parts, engine.embedding_dim), used, problems


def _publish(
    settings: Settings, request: TrainRequest, labels: list[str], data: _ClassData, fit: Fit, engine: SamEngine,
    progress: Progress, seconds: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """Stage 5: describe the head and publish it atomically."""
    started = time.perf_counter()
    progress.stage("publishing")
    head = fit.heads.final
    describe_head(head, engine, settings.points, fit.metrics)
    source = data.source
    head.info["provenance"] = {
        "source": source.name,
        "source_key": source.key(),
        "classes": {label: {**fit.counts[label], **_describe(source, label, data.missing)} for label in labels},
        "skipped": [{"file": str(p), "reason": r} for e in data.per_class.values() for p, r in e.skipped],
    }
    seconds["publishing"] = time.perf_counter() - started
    head.info["registry"] = {**asdict(request), "labels": labels, "stage_seconds": seconds, "created": time.time()}
    path = publish_head(head, settings.model_dir / "heads")
    progress.close()
    version = model_version(head, engine.sam.sam_type)
    log.info("published %s (%s) to %s", version, ", ".join(labels), path)
    result = {"version": version, "file": path.name, "labels": labels, "stage_seconds": seconds,
              "metrics": fit.metrics}  # fmt: skip
    if "feedback" in head.info:
        result["feedback"] = head.info["feedback"]
    return result


def publish_head(head: Head, folder: Path) -> Path:
    """Write the head under a name that tells its labels and version; atomic, so never half there."""
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(normalise(n) for n in head.class_names)).strip("-")[:60] or "head"
    project = (head.info.get("feedback") or {}).get("project")
    prefix = f"project-{project}-" if project else ""
    return head.save(folder / f"{prefix}{slug}-{head.version}.pt")


def _embed(
    engine: SamEngine, paths: list[Path], settings: Settings, store: BagStore, progress: Progress
) -> EmbeddedImages:
    return embed_files(
        engine, paths, points=settings.points, store=store, max_pixels=settings.max_image_pixels,
        progress=False, on_image=progress.advance, lock=compute_lock,
    )  # fmt: skip


def _describe(source: ClassSource, label: str, missing: dict[str, str]) -> dict[str, Any]:
    if label in missing:
        return {"source": source.name, "no_class_images": missing[label]}
    return dict(source.describe(label))


def _negative_queries(source: str) -> tuple[str, ...]:
    return ("_background",) if source == "folder" else NEGATIVE_QUERIES


def _share(count: int | None, queries: tuple[str, ...]) -> int | None:
    return None if count is None else max(1, count // len(queries))


def _check_usable(per_class: dict[str, EmbeddedImages]) -> None:
    empty = [label for label, embedded in per_class.items() if len(embedded.files) == 0]
    if empty:
        raise DataError(f"no readable class image for {empty}")
