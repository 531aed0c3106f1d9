"""Class data on disk: ``DIR/<class name>/*.jpg`` folders of single-object images per class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from usam_backend.core.errors import DataError
from usam_backend.core.images import IMAGE_EXTENSIONS

BACKGROUND_FOLDER = "_background"
"""Optional folder of negative images (none of the classes): needed to learn a single class."""


@dataclass(frozen=True)
class ClassFolders:
    """Image files per class, in sorted order; ``negatives`` are background-only images."""

    root: Path
    files: dict[str, list[Path]]
    negatives: list[Path]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.files)

    def count(self) -> int:
        return sum(len(paths) for paths in self.files.values()) + len(self.negatives)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, case-insensitive), sorted, no hidden files."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_class_folders(root: str | Path) -> ClassFolders:
    """Find the class folders under ``root``.

    Raises:
        DataError: ``root`` is missing or has no class folders, a class folder holds no images,
            or only one class is given without ``_background`` images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"class data folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_folders = [p for p in folders if p.name != BACKGROUND_FOLDER]
    if not class_folders:
        raise DataError(
            f"{root} has no class folders: expected {root}/<class name>/ folders of images, "
            "e.g. {root}/cat/001.jpg".replace("{root}", str(root))
        )
    files = {p.name: image_files(p) for p in class_folders}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"class folder(s) {', '.join(str(root / n) for n in empty)} hold no images ({allowed})")
    background = root / BACKGROUND_FOLDER
    negatives = image_files(background) if background.is_dir() else []
    if len(files) == 1 and not negatives:
        raise DataError(
            f"{root} has one class only ({class_folders[0].name}); add a second class folder, or "
            f"negative images (without any of the classes) in {background}"
        )
    return ClassFolders(root, files, negatives)
