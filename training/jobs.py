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
from training.head import Head
from training.pipeline import describe_head, fit_heads
from training.progress import Progress, Publish
from training.sources import make_source, resolve_source_name
from usam_backend.errors import DataError
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
    labels: list[str]
    project: str | None = None
    trigger: str = "manual"
    extra: dict[str, Any] = field(default_factory=dict)


def job_id(settings: Settings, labels: list[str], *, cuda: bool, nonce: str = "") -> str:
    """The same label set under the same data and model settings is the same job (idempotent)."""
    source = resolve_source_name(settings, cuda)
    parts = sorted({normalise(label) for label in labels})
    shaping = [*parts, source, settings.sam_type, str(settings.points), str(settings.seed), nonce]
    return "usam-train-" + hashlib.sha256("\x1f".join(shaping).encode()).hexdigest()[:16]


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
        return train_labels(get_settings(), TrainRequest(**request), publish=lambda snapshot: save(progress=snapshot))
    finally:
        stop.set()


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
    cuda = engine.device.type == "cuda"
    source = make_source(settings, cuda=cuda)
    count = settings.images_per_class or source.default_count()
    log.info("training %s from %s images (%s per class)", labels, source.name, count or "all")

    negative_queries = _negative_queries(source.name) if len(labels) == 1 else ()
    started = time.perf_counter()
    progress.stage("class images", None if count is None else count * (len(labels) + len(negative_queries)))
    files = {label: source.collect(label, count, progress) for label in labels}
    negative_files = [p for q in negative_queries for p in source.collect(q, _share(count, negative_queries), progress)]
    seconds["class_images"] = time.perf_counter() - started

    started = time.perf_counter()
    progress.stage("embeddings", sum(len(paths) for paths in files.values()) + len(negative_files))
    store = BagStore(settings.cache_dir / "bags", engine.sam.fingerprint, settings.points)
    per_class = {label: _embed(engine, paths, settings, store, progress) for label, paths in files.items()}
    negatives = _embed(engine, negative_files, settings, store, progress) if negative_files else None
    seconds["embeddings"] = time.perf_counter() - started
    _check_usable(per_class)

    started = time.perf_counter()
    progress.stage("training")
    fit = fit_heads(per_class, negatives, seed=settings.seed, epochs=settings.train_epochs)
    seconds["training_and_validation"] = time.perf_counter() - started

    started = time.perf_counter()
    progress.stage("publishing")
    head = fit.heads.final
    describe_head(head, engine, settings.points, fit.metrics)
    head.info["provenance"] = {
        "source": source.name,
        "source_key": source.key(),
        "classes": {label: {**fit.counts[label], **source.describe(label)} for label in labels},
        "skipped": [{"file": str(p), "reason": r} for e in per_class.values() for p, r in e.skipped],
    }
    seconds["publishing"] = time.perf_counter() - started
    head.info["registry"] = {**asdict(request), "labels": labels, "stage_seconds": seconds, "created": time.time()}
    path = publish_head(head, settings.model_dir / "heads")
    progress.close()
    version = model_version(head, engine.sam.sam_type)
    log.info("published %s (%s) to %s", version, ", ".join(labels), path)
    return {"version": version, "file": path.name, "labels": labels, "stage_seconds": seconds, "metrics": fit.metrics}


def publish_head(head: Head, folder: Path) -> Path:
    """Write the head under a name that tells its labels and version; atomic, so never half there."""
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(normalise(n) for n in head.class_names)).strip("-")[:60] or "head"
    return head.save(folder / f"{slug}-{head.version}.pt")


def _embed(
    engine: SamEngine, paths: list[Path], settings: Settings, store: BagStore, progress: Progress
) -> EmbeddedImages:
    return embed_files(
        engine, paths, points=settings.points, store=store, max_pixels=settings.max_image_pixels,
        progress=False, on_image=progress.advance, lock=compute_lock,
    )  # fmt: skip


def _negative_queries(source: str) -> tuple[str, ...]:
    return ("_background",) if source == "folder" else NEGATIVE_QUERIES


def _share(count: int | None, queries: tuple[str, ...]) -> int | None:
    return None if count is None else max(1, count // len(queries))


def _check_usable(per_class: dict[str, EmbeddedImages]) -> None:
    empty = [label for label, embedded in per_class.items() if len(embedded.files) == 0]
    if empty:
        raise DataError(f"no readable class image for {empty}")
