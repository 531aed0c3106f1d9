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
import time
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
class HeadInfo:
    """What the registry keeps of a head file without its weights."""

    path: Path
    class_names: tuple[str, ...]
    version: str  # the model_version Label Studio sees
    project: str | None
    mtime_ns: int
    classes: dict[str, int]  # normalised class name -> index


@dataclass(frozen=True)
class _Entry:
    stamp: tuple[int, int]
    info: HeadInfo | None
    problem: str | None


class HeadRegistry:
    """Scans the heads folder and matches heads to labels.

    Only each head's description is kept in memory (a few hundred bytes); weights are loaded for
    the heads actually chosen, :data:`LOADED` of them at most. The folder is rescanned when it
    changes (heads are published by renaming into it) or :data:`RESCAN_SECONDS` have passed, and
    a file is read again only when its size or time changed; choices are cached between scans."""

    LOADED = 8
    RESCAN_SECONDS = 5.0

    def __init__(self, folder: Path, sam_type: str):
        self.folder = folder
        self.sam_type = sam_type
        self._entries: dict[Path, _Entry] = {}
        self._usable: list[HeadInfo] = []
        self._stamp: tuple[int, float] | None = None  # folder mtime, time of the scan
        self._choices: dict[tuple[object, ...], HeadChoice | None] = {}
        self._loaded: dict[Path, tuple[int, Head]] = {}
        self._lock = threading.RLock()

    def infos(self) -> list[HeadInfo]:
        """Descriptions of the readable heads for this SAM type, newest first."""
        with self._lock:
            self._refresh()
            return list(self._usable)

    def problems(self) -> dict[str, str]:
        """Files in the heads folder that cannot serve here, and why."""
        with self._lock:
            self._refresh()
            return {str(path): e.problem for path, e in self._entries.items() if e.problem}

    def choose(self, labels: Sequence[NamedLabel], project: str | None = None) -> HeadChoice | None:
        """The head that serves most of these labels, if any: among equals, the project's own
        (trained on its annotations) first, then the newest."""
        with self._lock:
            self._refresh()
            key = (project, tuple((label.value, label.names) for label in labels))
            if key not in self._choices:
                self._choices[key] = self._choose(labels, project)
            return self._choices[key]

    def choose_version(
        self, labels: Sequence[NamedLabel], version: str, project: str | None = None
    ) -> HeadChoice | None:  # fmt: skip
        """The head of model version ``version`` for these labels, while its file is on disk and
        serves at least one of them (a job started under it finishes with it)."""
        with self._lock:
            self._refresh()
            usable = [info for info in self._usable if info.version == version]
        for info in usable:
            if info.project is not None and info.project != project:
                continue
            served = _match(info.classes, labels)
            if not served:
                continue
            try:
                head = self.load(info)
            except HeadError as exc:
                log.warning("could not load %s: %s", info.path, exc)
                return None
            values = tuple(dict.fromkeys(label.value for label in labels))
            return HeadChoice(head, info.path, info.version, served, tuple(v for v in values if v not in served))
        return None

    def versions(self) -> list[str]:
        return [info.version for info in self.infos()]

    def load(self, info: HeadInfo) -> Head:
        """The head's weights (kept for the :data:`LOADED` heads used last)."""
        with self._lock:
            found = self._loaded.get(info.path)
            if found is not None and found[0] == info.mtime_ns:
                self._loaded = {info.path: found, **self._loaded}
                return found[1]
        head = Head.load(info.path)
        with self._lock:
            recent = [(p, v) for p, v in self._loaded.items() if p != info.path][: self.LOADED - 1]
            self._loaded = {info.path: (info.mtime_ns, head), **dict(recent)}
        return head

    def prune(self, project: str, keep: int, protect: set[Path]) -> list[Path]:
        """Delete the project's own heads but the newest ``keep`` and those in ``protect``."""
        with self._lock:
            self._stamp = None
            own = [info for info in self.infos() if info.project == project]
            doomed = [info.path for info in own[keep:] if info.path not in protect]
            for path in doomed:
                path.unlink(missing_ok=True)
                log.info("pruned %s (project %s keeps its %d newest heads)", path.name, project, keep)
            self._stamp = None
            return doomed

    def _choose(self, labels: Sequence[NamedLabel], project: str | None) -> HeadChoice | None:
        values = tuple(dict.fromkeys(label.value for label in labels))
        best: HeadInfo | None = None
        best_served: dict[str, int] = {}
        best_rank = (0, False)
        for info in self._usable:
            if info.project is not None and info.project != project:
                continue
            served = _match(info.classes, labels)
            rank = (len(served), info.project is not None)
            if served and rank > best_rank:
                best, best_served, best_rank = info, served, rank
        if best is None:
            return None
        try:
            head = self.load(best)
        except HeadError as exc:  # removed or replaced since the scan
            log.warning("could not load %s: %s", best.path, exc)
            return None
        missing = tuple(v for v in values if v not in best_served)
        return HeadChoice(head, best.path, best.version, best_served, missing)

    def _refresh(self) -> None:
        try:
            folder_mtime = self.folder.stat().st_mtime_ns
        except OSError:
            folder_mtime = 0
        now = time.monotonic()
        if self._stamp is not None and self._stamp[0] == folder_mtime and now - self._stamp[1] < self.RESCAN_SECONDS:
            return
        paths = sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []
        self._entries = {path: self._entry(path) for path in paths}
        usable = [e.info for e in self._entries.values() if e.info is not None and e.problem is None]
        self._usable = sorted(usable, key=lambda info: info.mtime_ns, reverse=True)
        self._choices = {}
        self._stamp = (folder_mtime, now)

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
        classes = {normalise(name): index for index, name in enumerate(head.class_names)}
        info = HeadInfo(path, head.class_names, model_version(head, self.sam_type), head_project(head),
                        stat.st_mtime_ns, classes)  # fmt: skip
        if head.sam_type not in (None, self.sam_type):
            return _Entry(stamp, info, f"trained for SAM {head.sam_type}, this server runs {self.sam_type}")
        return _Entry(stamp, info, None)


def _match(classes: dict[str, int], labels: Sequence[NamedLabel]) -> dict[str, int]:
    served: dict[str, int] = {}
    for label in labels:
        for name in label.names:  # the label's own value first, then its aliases
            if name in classes:
                served.setdefault(label.value, classes[name])
                break
    return served
