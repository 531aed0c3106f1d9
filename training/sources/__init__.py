"""Where class images come from: a folder, Stable Diffusion, or openly licensed web images.

Each source has a ``key`` naming everything that shapes its images (model, prompt, licences...),
so the class store never mixes images made under other settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from training.class_store import ClassStore
from training.progress import Progress
from training.recipe import resolve_source_name
from training.sources.folder import FolderSource
from training.sources.synthetic import SyntheticSource
from training.sources.web import WebSource
from usam_backend.core.settings import Settings


class ClassSource(Protocol):
    name: str

    def key(self) -> str: ...

    def default_count(self) -> int | None: ...

    def collect(self, label: str, count: int | None, progress: Progress) -> list[Path]:
        """Image files for ``label`` (``count`` of them, or all the source has when None)."""
        ...

    def describe(self, label: str) -> dict[str, object]:
        """Provenance of the label's images: counts, licences, prompts."""
        ...


def make_source(settings: Settings, *, cuda: bool) -> ClassSource:
    name = resolve_source_name(settings, cuda)
    store = ClassStore(settings.cache_dir / "classes")
    if name == "folder":
        return FolderSource(settings.data_dir)
    if name == "synthetic":
        return SyntheticSource(settings, store, cuda=cuda)
    return WebSource(settings, store)
