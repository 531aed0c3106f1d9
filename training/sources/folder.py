"""Class images a user supplies: ``USAM_DATA_DIR/<label>/*.jpg`` (folder names matched without case)."""

from __future__ import annotations

from pathlib import Path

from training.data import image_files
from training.progress import Progress
from usam_backend.core.errors import DataError
from usam_backend.core.labels import normalise


class FolderSource:
    name = "folder"

    def __init__(self, root: Path | None):
        if root is None:
            raise DataError("USAM_DATA_SOURCE=folder needs USAM_DATA_DIR, a folder of <label>/ image folders")
        self.root = root

    def key(self) -> str:
        return "folder"

    def default_count(self) -> int | None:
        return None

    def collect(self, label: str, count: int | None, progress: Progress) -> list[Path]:
        folder = self._folder(label)
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder} holds no images for label {label!r}")
        progress.advance(1)
        return files if count is None else files[:count]

    def describe(self, label: str) -> dict[str, object]:
        return {"source": "folder", "folder": str(self._folder(label))}

    def _folder(self, label: str) -> Path:
        if not self.root.is_dir():
            raise DataError(f"USAM_DATA_DIR={self.root} is not a folder")
        wanted = normalise(label)
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and normalise(folder.name) == wanted:
                return folder
        raise DataError(f"no folder for label {label!r} in USAM_DATA_DIR={self.root}: add {self.root / label}/*.jpg")
