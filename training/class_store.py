"""Class images, content-addressed and shared by every project and job.

``<root>/<source key>/<label key>/`` holds images named by the SHA-256 of their bytes and a
``manifest.json`` recording, for each image, where it came from (prompt and seed, or licence,
author and source URL). The manifest is rewritten atomically after every image, so a job killed
half-way resumes where it stopped, and a class fetched or generated once is reused: adding a label
to a project costs that one label.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from usam_backend.core.fileio import atomic_path
from usam_backend.core.labels import normalise


def label_key(label: str) -> str:
    """A filesystem-safe, case-free folder name for a label, unique per normalised label."""
    name = normalise(label)
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "label"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass
class ClassImage:
    file: str  # "<sha256>.<ext>" inside the class folder
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    label: str
    source: str
    images: list[ClassImage] = field(default_factory=list)
    exhausted: bool = False  # the source has nothing more to give for this label
    cursor: dict[str, Any] = field(default_factory=dict)  # where the source resumes (seed index, page)

    def hashes(self) -> set[str]:
        return {image.sha256 for image in self.images}


class ClassFolder:
    """One label's images from one source (its manifest plus the files)."""

    def __init__(self, folder: Path, label: str, source: str):
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        self.manifest = self._read(label, source)

    def paths(self, limit: int | None = None) -> list[Path]:
        images = self.manifest.images if limit is None else self.manifest.images[:limit]
        return [self.folder / image.file for image in images]

    def add(self, data: bytes, extension: str, meta: dict[str, Any]) -> bool:
        """Store one image; False when the same bytes are already there (a duplicate)."""
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.manifest.hashes():
            return False
        name = f"{digest}.{extension.lstrip('.')}"
        with atomic_path(self.folder / name) as tmp:
            tmp.write_bytes(data)
        self.manifest.images.append(ClassImage(name, digest, meta))
        self.save()
        return True

    def save(self) -> None:
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(asdict(self.manifest), indent=1))

    def _read(self, label: str, source: str) -> Manifest:
        if self.manifest_path.is_file():
            try:
                raw = json.loads(self.manifest_path.read_text())
                images = [ClassImage(**image) for image in raw.get("images", [])]
                present = [image for image in images if (self.folder / image.file).is_file()]
                exhausted = bool(raw.get("exhausted")) and len(present) == len(images)
                return Manifest(label, source, present, exhausted, dict(raw.get("cursor") or {}))
            except (OSError, ValueError, TypeError):
                pass  # an unreadable manifest is rebuilt from nothing; the image files are reused by hash
        return Manifest(label, source)


class ClassStore:
    def __init__(self, root: Path):
        self.root = root

    @contextmanager
    def open(self, source_key: str, label: str) -> Iterator[ClassFolder]:
        """The label's folder, locked against other jobs and workers filling it at the same time."""
        folder = self.root / source_key / label_key(label)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield ClassFolder(folder, label, source_key)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
