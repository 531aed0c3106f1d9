"""``usam train``: class folders -> cached point embeddings -> teacher/student -> validated head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data import scan_class_folders
from training.embeddings import BagStore, EmbeddedImages, embed_files
from training.head import Head
from training.metrics import bag_accuracy
from training.train import TrainedHeads, train_heads
from usam_backend.errors import DataError
from usam_backend.sam.engine import SamEngine
from usam_backend.settings import Settings

MIN_IMAGES_FOR_VALIDATION = 5
"""A class with fewer images keeps them all for training."""


@dataclass
class Split:
    bags: np.ndarray  # N, d, D
    targets: np.ndarray  # N, C

    def __len__(self) -> int:
        return len(self.bags)


@dataclass
class TrainResult:
    head: Head
    path: Path
    metrics: dict[str, Any]
    skipped: list[tuple[Path, str]]


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
) -> TrainResult:
    """Train a head on ``data_dir/<class>/*`` images and save it atomically to ``out``.

    Unreadable images are skipped and recorded; nothing is written unless training succeeds.
    """
    folders = scan_class_folders(data_dir)
    engine = engine or SamEngine.from_settings(settings)
    store = BagStore(settings.cache_dir / "bags" if cache else None, engine.sam.fingerprint, settings.points)

    def embed(files: list[Path], what: str) -> EmbeddedImages:
        return embed_files(
            engine, files, points=settings.points, store=store, max_pixels=settings.max_image_pixels,
            desc=f"embedding {what}", progress=progress,
        )  # fmt: skip

    per_class = {name: embed(files, name) for name, files in folders.files.items()}
    negatives = embed(folders.negatives, "background images") if folders.negatives else None
    skipped = [item for embedded in per_class.values() for item in embedded.skipped]
    if negatives is not None:
        skipped += negatives.skipped
    unreadable = [name for name, embedded in per_class.items() if len(embedded.files) == 0]
    if unreadable:
        reasons = "; ".join(reason for _, reason in skipped[:3])
        raise DataError(f"no readable image for class(es) {unreadable} ({reasons})")

    fit = fit_heads(per_class, negatives, val_fraction=val_fraction, seed=seed, distill=distill, progress=progress,
                    **options)  # fmt: skip
    head = fit.heads.final
    describe_head(head, engine, settings.points, fit.metrics)
    head.info["provenance"] = {
        "source": "folder",
        "data_dir": str(Path(data_dir).resolve()),
        "classes": fit.counts,
        "skipped": [{"file": str(path), "reason": reason} for path, reason in skipped],
    }
    path = head.save(out)
    return TrainResult(head, path, fit.metrics, skipped)


@dataclass
class Fit:
    heads: TrainedHeads
    metrics: dict[str, Any]
    counts: dict[str, dict[str, int]]


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
    """Hold out images per class, train teacher and student, and score both on the held-out images."""
    train, validation, counts = _split(per_class, negatives, val_fraction, seed)
    names = tuple(per_class)
    heads = train_heads(train.bags, train.targets, names, distill=distill, seed=seed, progress=progress, **options)
    return Fit(heads, _metrics(heads, train, validation), counts)


def describe_head(head: Head, engine: SamEngine, points: int, metrics: dict[str, Any]) -> None:
    """Record in the head what it needs to be used safely: SAM type and weights, grid, metrics."""
    head.info.update(
        sam_type=engine.sam.sam_type,
        sam_weights=engine.sam.weights,
        random_weights=engine.sam.random_weights,
        points=points,
        embedding_dim=engine.embedding_dim,
        metrics=metrics,
    )


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
