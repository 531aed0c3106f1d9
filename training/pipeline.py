"""The one training orchestration: class images -> point embeddings -> teacher and student ->
validation -> a self-describing head, written atomically.

Both ``usam train`` (:func:`train_from_folders`) and the training jobs
(:mod:`usam_backend.jobs.training`, through :func:`train_labels`) run these stages and write the
same provenance into the head:

1. class images per label from a source (a folder, Stable Diffusion, the web; ``sources/``);
2. SAM embeddings per image, cached by image hash, SAM weights and grid (``embeddings.py``);
3. teacher and student training (with annotated instances when a project has some);
4. validation on held-out class images;
5. describe and write the head: ``info["provenance"]`` (where each class's images came from) and
   ``info["registry"]`` (labels, project, trigger, recipe, stage timings).

Every stage leaves files that a re-run reuses, and the head is written in one atomic step, so a
run killed anywhere leaves nothing half-written and resumes after the last image it stored.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.calibration import calibrate
from training.data import BACKGROUND_FOLDER, scan_class_folders
from training.embeddings import BagStore, EmbeddedImages, embed_files
from training.feedback import Instances
from training.head import Head
from training.metrics import bag_accuracy
from training.progress import Progress
from training.recipe import Recipe
from training.sources import ClassSource, make_source
from training.sources.folder import FolderSource
from training.train import TrainedHeads, train_heads
from usam_backend.core.errors import DataError
from usam_backend.core.labels import normalise
from usam_backend.core.settings import Settings
from usam_backend.sam.engine import SamEngine

log = logging.getLogger("usam.training")

MIN_IMAGES_FOR_VALIDATION = 5
"""A class with fewer images keeps them all for training."""

NEGATIVE_QUERIES = ("landscape", "empty room", "street")
"""With one label, MIL needs images without it: generic scenes from the same source (a folder
source uses its ``_background`` folder instead)."""

Lock = AbstractContextManager[Any]


@dataclass
class Split:
    bags: np.ndarray  # N, d, D
    targets: np.ndarray  # N, C

    def __len__(self) -> int:
        return len(self.bags)


@dataclass
class ClassData:
    """Stages 1-2: the embedded class images of each label (and negatives, if any)."""

    source: ClassSource
    per_class: dict[str, EmbeddedImages]
    negatives: EmbeddedImages | None
    missing: dict[str, str] = field(default_factory=dict)  # label -> why it has no class images

    def skipped(self) -> list[tuple[Path, str]]:
        groups = [*self.per_class.values(), *([self.negatives] if self.negatives is not None else [])]
        return [item for embedded in groups for item in embedded.skipped]


@dataclass
class Fit:
    heads: TrainedHeads
    metrics: dict[str, Any]
    counts: dict[str, dict[str, int]]


@dataclass
class Trained:
    """What a training run produced and where it went."""

    head: Head
    path: Path
    metrics: dict[str, Any]
    skipped: list[tuple[Path, str]]
    stage_seconds: dict[str, float]


def class_data(
    source: ClassSource, labels: list[str], engine: SamEngine, settings: Settings, progress: Progress,
    seconds: dict[str, float], *, optional: bool = False, cache: bool = True, lock: Lock | None = None,
) -> ClassData:  # fmt: skip
    """Stages 1 and 2: class images, then their point embeddings (both reused across runs).

    ``optional``: a label whose class images cannot be had is recorded in ``missing`` instead of
    failing (a project may learn it from annotations alone)."""
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
    store = BagStore(settings.cache_dir / "bags" if cache else None, engine.sam.fingerprint, settings.points)

    def embed(paths: list[Path]) -> EmbeddedImages:
        return embed_files(
            engine, paths, points=settings.points, store=store, max_pixels=settings.max_image_pixels,
            progress=False, on_image=progress.advance, lock=lock,
        )  # fmt: skip

    per_class = {label: embed(paths) for label, paths in files.items()}
    negatives = embed(negative_files) if negative_files else None
    seconds["embeddings"] = time.perf_counter() - started
    unreadable = [label for label, embedded in per_class.items() if len(embedded.files) == 0 and label not in missing]
    if unreadable and not optional:
        reasons = "; ".join(reason for embedded in per_class.values() for _, reason in embedded.skipped[:3])
        raise DataError(f"no readable image for class(es) {unreadable} ({reasons})")
    for label in unreadable:
        missing[label] = "no readable class image"
    return ClassData(source, per_class, negatives, missing)


def fit_heads(
    per_class: dict[str, EmbeddedImages],
    negatives: EmbeddedImages | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    distill: bool = True,
    progress: bool = False,
    **options: Any,
) -> Fit:
    """Stages 3-4: hold out images per class, train teacher and student, score both on the
    held-out images. ``options`` go to :func:`training.train.train_heads` (epochs, instances...)."""
    train, validation, counts = _split(per_class, negatives, val_fraction, seed)
    names = tuple(per_class)
    heads = train_heads(train.bags, train.targets, names, distill=distill, seed=seed, progress=progress, **options)
    return Fit(heads, _metrics(heads, train, validation), counts)


def describe_head(
    head: Head, engine: SamEngine, recipe: Recipe, data: ClassData, fit: Fit, seconds: dict[str, float],
    **registry: Any,
) -> None:  # fmt: skip
    """Stage 5a: record in the head what it needs to be used safely (SAM type and weights, grid,
    metrics), where its data came from, and how it was made. One schema for every head."""
    labels = list(data.per_class)
    head.info.update(
        sam_type=engine.sam.sam_type,
        sam_weights=engine.sam.weights,
        random_weights=engine.sam.random_weights,
        points=recipe.points,
        embedding_dim=engine.embedding_dim,
        metrics=fit.metrics,
    )
    source = data.source
    counts = {label: fit.counts.get(label, {"images": 0, "train": 0, "validation": 0}) for label in labels}
    head.info["provenance"] = {
        "source": source.name,
        "source_key": source.key(),
        "classes": {label: {**counts[label], **_describe(source, label, data.missing)} for label in labels},
        "negatives": fit.counts.get("_background"),
        "skipped": [{"file": str(path), "reason": reason} for path, reason in data.skipped()],
    }
    head.info["registry"] = {
        "labels": labels,
        "recipe": recipe.to_dict(),
        "stage_seconds": seconds,
        "created": time.time(),
        **registry,
    }


def head_file_name(head: Head) -> str:
    """A name that tells a head's labels, project (if any) and version."""
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(normalise(n) for n in head.class_names)).strip("-")[:60] or "head"
    project = (head.info.get("feedback") or {}).get("project")
    prefix = f"project-{project}-" if project else ""
    return f"{prefix}{slug}-{head.version}.pt"


def train_labels(
    settings: Settings, recipe: Recipe, labels: list[str], engine: SamEngine, out: Path, *,
    progress: Progress | None = None, instances: Instances | None = None, feedback: dict[str, Any] | None = None,
    calibration: Instances | None = None, lock: Lock | None = None, **registry: Any,
) -> Trained:  # fmt: skip
    """All five stages for ``labels`` from the recipe's data source; the head is written into the
    folder ``out`` under :func:`head_file_name`.

    ``instances``: annotated points of a project (then labels without class images may be
    learned from them alone; ``feedback`` is recorded in the head). ``calibration``: annotated
    points of other tasks, held out from training, that the head's temperature is fitted on
    (:mod:`training.calibration`), so its probabilities are honest on tasks it has not seen."""
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise DataError("training needs at least one label")
    progress = progress or Progress()
    seconds: dict[str, float] = {}
    source = make_source(settings, cuda=engine.device.type == "cuda")
    data = class_data(source, labels, engine, settings, progress, seconds, optional=instances is not None, lock=lock)
    if instances is not None:
        _check_learnable(data, labels, instances)
    started = time.perf_counter()
    progress.stage("training")
    extra: dict[str, Any] = {}
    if instances is not None and len(instances.y):
        extra = {"instances": instances.x, "instance_targets": instances.y}
    fit = fit_heads(data.per_class, data.negatives, seed=recipe.seed, epochs=recipe.train_epochs, **extra)
    seconds["training_and_validation"] = time.perf_counter() - started
    started = time.perf_counter()
    progress.stage("publishing")
    head = fit.heads.final
    if feedback is not None:
        head.info["feedback"] = feedback
        usable = instances is not None and len(instances.y) > 0  # calibrate before saving: it changes the head
        feedback["calibration"] = (
            calibrate(head, instances.x, instances.y) if instances is not None and usable else None
        )
    seconds["publishing"] = 0.0
    describe_head(head, engine, recipe, data, fit, seconds, **registry)
    path = head.save(out / head_file_name(head))
    seconds["publishing"] = time.perf_counter() - started
    progress.close()
    return Trained(head, path, fit.metrics, data.skipped(), seconds)


def train_from_folders(
    settings: Settings,
    data_dir: str | Path,
    out: str | Path,
    *,
    engine: SamEngine | None = None,
    seed: int = 0,
    distill: bool = True,
    val_fraction: float = 0.2,
    cache: bool = True,
    progress: bool = True,
    **options: Any,
) -> Trained:
    """``usam train``: a head on ``data_dir/<class>/*`` images (``_background/`` for negatives),
    saved atomically to ``out``. The same stages and head description as :func:`train_labels`.

    Unreadable images are skipped and recorded; nothing is written unless training succeeds."""
    folders = scan_class_folders(data_dir)
    engine = engine or SamEngine.from_settings(settings)
    epochs = options.get("epochs", settings.train_epochs)
    recipe = Recipe.from_settings(
        settings.replace(seed=seed, data_source="folder", train_epochs=epochs),
        cuda=engine.device.type == "cuda", sam_fingerprint=engine.sam.fingerprint,
    )  # fmt: skip
    seconds: dict[str, float] = {}
    bars = Progress(bars=progress)
    source = FolderSource(folders.root)
    data = class_data(source, list(folders.class_names), engine, settings.replace(images_per_class=0), bars, seconds,
                      cache=cache)  # fmt: skip
    if folders.negatives and data.negatives is None:  # several classes: negatives are optional extra data
        data.negatives = _embed_negatives(engine, folders.negatives, settings, cache, bars)
    started = time.perf_counter()
    bars.stage("training")
    fit = fit_heads(data.per_class, data.negatives, val_fraction=val_fraction, seed=seed, distill=distill,
                    progress=progress, **options)  # fmt: skip
    seconds["training_and_validation"] = time.perf_counter() - started
    started = time.perf_counter()
    head = fit.heads.final
    seconds["publishing"] = 0.0
    describe_head(head, engine, recipe, data, fit, seconds, trigger="usam train", data_dir=str(folders.root.resolve()))
    path = head.save(out)
    seconds["publishing"] = time.perf_counter() - started
    bars.close()
    return Trained(head, path, fit.metrics, data.skipped(), seconds)


def _embed_negatives(
    engine: SamEngine, files: list[Path], settings: Settings, cache: bool, progress: Progress
) -> EmbeddedImages:
    store = BagStore(settings.cache_dir / "bags" if cache else None, engine.sam.fingerprint, settings.points)
    progress.stage("negative embeddings", len(files))
    return embed_files(
        engine, files, points=settings.points, store=store, max_pixels=settings.max_image_pixels, progress=False,
        on_image=progress.advance,
    )  # fmt: skip


def _check_learnable(data: ClassData, labels: list[str], instances: Instances) -> None:
    annotated = {labels[int(i)] for i in np.unique(instances.y) if i >= 0}
    if len(data.missing) == len(labels) and not annotated:
        raise DataError(f"no class images for any label ({'; '.join(data.missing.values())})")
    unlearnable = {label: reason for label, reason in data.missing.items() if label not in annotated}
    if unlearnable:
        raise DataError(
            "no class images and no annotated region for "
            + "; ".join(f"{label!r} ({reason})" for label, reason in unlearnable.items())
        )


def _describe(source: ClassSource, label: str, missing: dict[str, str]) -> dict[str, Any]:
    if label in missing:
        return {"source": source.name, "no_class_images": missing[label]}
    return dict(source.describe(label))


def _negative_queries(source: str) -> tuple[str, ...]:
    return (BACKGROUND_FOLDER,) if source == "folder" else NEGATIVE_QUERIES


def _share(count: int | None, queries: tuple[str, ...]) -> int | None:
    return None if count is None else max(1, count // len(queries))


def _split(
    per_class: dict[str, EmbeddedImages], negatives: EmbeddedImages | None, val_fraction: float, seed: int
) -> tuple[Split, Split, dict[str, dict[str, int]]]:
    """Hold out ``val_fraction`` of each class (classes of 5+ images), reproducibly by ``seed``."""
    rng = np.random.default_rng(seed)
    names = list(per_class)
    groups = [(i, per_class[name]) for i, name in enumerate(names)]
    if negatives is not None and len(negatives.files):
        groups.append((-1, negatives))
    parts: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "val_x": [], "val_y": []}
    counts: dict[str, dict[str, int]] = {}
    for class_index, embedded in groups:
        n = len(embedded.files)
        held = int(n * val_fraction) if n >= MIN_IMAGES_FOR_VALIDATION else 0
        order = rng.permutation(n)
        target = np.zeros(len(names), dtype=np.float32)
        if class_index >= 0:
            target[class_index] = 1.0
        for key, index in (("val", order[:held]), ("train", order[held:])):
            parts[f"{key}_x"].append(embedded.bags[index])
            parts[f"{key}_y"].append(np.repeat(target[None], len(index), axis=0))
        counts[names[class_index] if class_index >= 0 else "_background"] = {
            "images": n,
            "train": n - held,
            "validation": held,
        }
    dim = groups[0][1].bags.shape[1:]

    def stack(key: str) -> Split:
        x = np.concatenate(parts[f"{key}_x"]) if parts[f"{key}_x"] else np.zeros((0, *dim), np.float32)
        y = np.concatenate(parts[f"{key}_y"]) if parts[f"{key}_y"] else np.zeros((0, len(names)), np.float32)
        return Split(x, y)

    return stack("train"), stack("val"), counts


def _metrics(heads: TrainedHeads, train: Split, validation: Split) -> dict[str, Any]:
    """Image-level accuracy of teacher and student on training and held-out class images."""
    metrics: dict[str, Any] = {}
    for split_name, split in (("train", train), ("validation", validation)):
        if len(split) == 0:
            continue
        entry: dict[str, Any] = {"images": len(split)}
        for role, head in (("teacher", heads.teacher), ("student", heads.student)):
            if head is None:
                continue
            probs = head.predict_proba(split.bags.reshape(-1, split.bags.shape[-1]))
            entry[f"{role}_accuracy"] = bag_accuracy(probs.reshape(len(split), -1, probs.shape[-1]), split.targets)
        metrics[split_name] = entry
    return metrics
