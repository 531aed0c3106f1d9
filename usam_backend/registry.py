"""Trained heads on disk, and which one serves a project's label set.

Heads live in ``USAM_MODEL_DIR/heads/*.pt``; each file describes itself (classes, SAM type,
metrics), so the folder is the registry. A head serves a project label when one of its classes
is named like the label's value or one of its ``predicted_values``.

Heads trained on a project's annotations (``info["feedback"]["project"]``) serve that project
only, and it prefers them to shared heads that serve no more of its labels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from training.head import Head
from usam_backend.core.errors import HeadError
from usam_backend.core.labels import normalise

log = logging.getLogger(__name__)


def model_version(head: Head, sam_type: str) -> str:
    """The model_version Label Studio sees: changes whenever the head does."""
    suffix = "-random-sam" if head.info.get("random_weights") else ""
    return f"usam-{sam_type}-{head.version}{suffix}"


def head_project(head: Head) -> str | None:
    """The project whose annotations trained this head (it serves that project only), if any."""
    project = (head.info.get("feedback") or {}).get("project")
    return None if project is None else str(project)


def no_head_version(sam_type: str) -> str:
    return f"usam-{sam_type}-no-head-yet"


class NamedLabel(Protocol):
    """A project label: its value and the normalised names a head class may carry to serve it
    (Label Studio's :class:`~usam_backend.labelstudio.config.ProjectLabel` is one)."""

    @property
    def value(self) -> str: ...

    @property
    def names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class HeadChoice:
    """A head chosen for a label config.

    Attributes:
        served: project label value -> index of the head class that predicts it.
        missing: project label values the head cannot predict.
    """

    head: Head
    path: Path
    version: str
    served: dict[str, int]
    missing: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    stamp: tuple[int, int]
    head: Head | None
    problem: str | None


class HeadRegistry:
    """Scans the heads folder (re-reading only files that changed) and matches heads to labels."""

    def __init__(self, folder: Path, sam_type: str):
        self.folder = folder
        self.sam_type = sam_type
        self._entries: dict[Path, _Entry] = {}
        self._lock = threading.Lock()

    def heads(self) -> list[tuple[Path, Head]]:
        """Readable heads for this SAM type, newest first."""
        self._refresh()
        usable = [(path, e.head) for path, e in self._entries.items() if e.head is not None and e.problem is None]
        return sorted(usable, key=lambda item: item[0].stat().st_mtime_ns, reverse=True)

    def problems(self) -> dict[str, str]:
        """Files in the heads folder that cannot serve here, and why."""
        self._refresh()
        return {str(path): e.problem for path, e in self._entries.items() if e.problem}

    def choose(self, labels: Sequence[NamedLabel], project: str | None = None) -> HeadChoice | None:
        """The head that serves most of these labels, if any: among equals, the project's own
        (trained on its annotations) first, then the newest."""
        values = tuple(dict.fromkeys(label.value for label in labels))
        best: HeadChoice | None = None
        best_rank = (0, False)
        for path, head in self.heads():
            owner = head_project(head)
            if owner is not None and owner != project:
                continue
            served = _match(head, labels)
            rank = (len(served), owner is not None)
            if served and rank > best_rank:
                missing = tuple(v for v in values if v not in served)
                best, best_rank = HeadChoice(head, path, model_version(head, self.sam_type), served, missing), rank
        return best

    def versions(self) -> list[str]:
        return [model_version(head, self.sam_type) for _, head in self.heads()]

    def _refresh(self) -> None:
        with self._lock:
            paths = sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []
            self._entries = {path: self._entry(path) for path in paths}

    def _entry(self, path: Path) -> _Entry:
        try:
            stat = path.stat()
        except OSError:
            return _Entry((0, 0), None, "vanished while reading")
        stamp = (stat.st_mtime_ns, stat.st_size)
        known = self._entries.get(path)
        if known is not None and known.stamp == stamp:
            return known
        try:
            head = Head.load(path)
        except HeadError as exc:
            log.warning("ignoring %s: %s", path, exc)
            return _Entry(stamp, None, str(exc))
        if head.sam_type not in (None, self.sam_type):
            return _Entry(stamp, head, f"trained for SAM {head.sam_type}, this server runs {self.sam_type}")
        return _Entry(stamp, head, None)


def _match(head: Head, labels: Sequence[NamedLabel]) -> dict[str, int]:
    classes = {normalise(name): index for index, name in enumerate(head.class_names)}
    served: dict[str, int] = {}
    for label in labels:
        for name in label.names:  # the label's own value first, then its aliases
            if name in classes:
                served.setdefault(label.value, classes[name])
                break
    return served
