"""Point-embedding bags of class images, cached on disk by image content, SAM weights and grid."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from usam_backend.core.errors import ImageError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.images import load_image
from usam_backend.sam.engine import SamEngine


@dataclass
class EmbeddedImages:
    """bags (N, d, D) float32 for the ``files`` that could be read; ``skipped`` says why not."""

    bags: np.ndarray
    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class BagStore:
    """On-disk cache of bags: ``<root>/<sam fingerprint>/p<points>/<sha256 of the file>.npy``.

    Stored as float16 (half the disk; the head does not notice) and read back as float32.
    """

    def __init__(self, root: Path | None, fingerprint: str, points: int):
        self.folder = None if root is None else root / fingerprint / f"p{points}"

    def get(self, digest: str) -> np.ndarray | None:
        if self.folder is None:
            return None
        path = self.folder / f"{digest}.npy"
        try:
            return np.load(path).astype(np.float32) if path.is_file() else None
        except (OSError, ValueError):  # a damaged entry is recomputed
            return None

    def put(self, digest: str, bag: np.ndarray) -> None:
        if self.folder is None:
            return
        with atomic_path(self.folder / f"{digest}.npy") as tmp, tmp.open("wb") as out:
            np.save(out, bag.astype(np.float16))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embed_files(
    engine: SamEngine,
    files: list[Path],
    *,
    points: int,
    store: BagStore,
    max_pixels: int,
    desc: str = "embedding images",
    progress: bool = True,
    on_image: Callable[[], None] | None = None,
    lock: AbstractContextManager[Any] | None = None,
) -> EmbeddedImages:
    """The (d, D) grid-point embeddings of each file; unreadable images are skipped, not fatal.

    ``on_image`` is called after each file; ``lock`` is held around each SAM computation.
    """
    bags: list[np.ndarray] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(files, desc=desc, unit="img", disable=not progress):
        try:
            bags.append(_bag(engine, path, points, store, max_pixels, lock))
            kept.append(path)
        except ImageError as exc:
            skipped.append((path, str(exc)))
        if on_image is not None:
            on_image()
    dim = engine.embedding_dim
    stacked = np.stack(bags) if bags else np.zeros((0, points, dim), dtype=np.float32)
    return EmbeddedImages(stacked, kept, skipped)


def _bag(
    engine: SamEngine,
    path: Path,
    points: int,
    store: BagStore,
    max_pixels: int,
    lock: AbstractContextManager[Any] | None,
) -> np.ndarray:
    digest = file_digest(path)
    bag = store.get(digest)
    if bag is None:
        image = load_image(path, max_pixels=max_pixels)
        with lock or nullcontext():
            bag = engine.point_embeddings(image, points, use_cache=False)
        # Rounded like the cache stores it, so a first run and a cached run train identically.
        bag = bag.astype(np.float16).astype(np.float32)
        store.put(digest, bag)
    return bag
