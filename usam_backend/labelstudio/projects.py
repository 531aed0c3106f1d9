"""What the backend remembers about Label Studio projects, on disk so it survives restarts.

``USAM_MODEL_DIR/projects/<id>.json``: the last label config, Label Studio's URL and token (file
mode 0600). ``USAM_MODEL_DIR/events/<id>.jsonl``: every webhook event, one JSON object a line, for
the training worker and the feedback learner to read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from usam_backend.core.errors import UsamError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.settings import Settings


class UnknownProjectError(UsamError):
    """A request names a project this backend has never been set up for."""


def project_id(uid: object) -> str:
    """Label Studio sends ``"<id>.<created timestamp>"`` to /setup and /predict, the bare id in webhooks."""
    text = str(uid).strip()
    head = text.split(".", 1)[0]
    if not head.isdigit():
        raise UnknownProjectError(f"{text[:50]!r} is not a Label Studio project id")
    return head


@dataclass
class ProjectRecord:
    """A project as its last ``/setup`` (or ``PROJECT_UPDATED``) described it.

    ``hostname`` is Label Studio's URL as ``/setup`` sent it; it is used only when
    ``hostname_trusted`` (see :func:`label_studio_origin`)."""

    id: str
    label_config: str
    hostname: str | None = None
    access_token: str | None = None
    updated: float = 0.0
    hostname_trusted: bool = False


@dataclass(frozen=True)
class LabelStudioOrigin:
    """Where a project's Label Studio is, and which credentials may go there.

    Attributes:
        url: Label Studio's URL, or None when unknown.
        api_key: ``LABEL_STUDIO_API_KEY``: only ever sent to ``LABEL_STUDIO_URL``.
        setup_token: the legacy token the project's ``/setup`` sent.
        named_by_operator: the URL is ``LABEL_STUDIO_URL`` (not a ``/setup`` hostname).
    """

    url: str | None
    api_key: str | None
    setup_token: str | None
    named_by_operator: bool


def label_studio_origin(settings: Settings, record: ProjectRecord | None) -> LabelStudioOrigin:
    """``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY`` (else the /setup token); without it, the
    hostname a trusted ``/setup`` sent, with that /setup's own token and never the API key."""
    token = record.access_token if record else None
    if settings.label_studio_url:
        return LabelStudioOrigin(settings.label_studio_url, settings.label_studio_api_key, token, True)
    if record is not None and record.hostname and record.hostname_trusted:
        return LabelStudioOrigin(record.hostname, None, token, False)
    return LabelStudioOrigin(None, None, None, False)


class ProjectStore:
    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, ProjectRecord] = {}
        self._lock = threading.Lock()

    def get(self, pid: str) -> ProjectRecord | None:
        with self._lock:
            if pid in self._cache:
                return self._cache[pid]
        path = self.folder / f"{pid}.json"
        if not path.is_file():
            return None
        try:
            record = ProjectRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        with self._lock:
            self._cache[pid] = record
        return record

    def put(self, record: ProjectRecord) -> None:
        record.updated = time.time()
        with atomic_path(self.folder / f"{record.id}.json") as tmp:
            tmp.write_text(json.dumps(asdict(record)))
            os.chmod(tmp, 0o600)  # holds a Label Studio token
        with self._lock:
            self._cache[record.id] = record

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []


_LOG_LOCKS: dict[Path, threading.Lock] = {}
_LOG_LOCKS_GUARD = threading.Lock()


def _log_lock(path: Path) -> threading.Lock:
    """One lock per log file in this process, however many EventLog objects point at it."""
    with _LOG_LOCKS_GUARD:
        return _LOG_LOCKS.setdefault(path.resolve(), threading.Lock())


class EventLog:
    """Append-only webhook events per project, durable before the webhook is answered.

    ``<id>.jsonl`` grows until the feedback store has folded every event in; then
    :meth:`rotate` moves it to ``<id>.jsonl.1`` (the previous generation is dropped), so a log
    holds what is not yet processed plus at most :data:`ROTATE_BYTES` of history."""

    ROTATE_BYTES = 8 * 1024 * 1024

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, pid: str) -> Path:
        return self.folder / f"{pid}.jsonl"

    def append(self, pid: str, event: dict[str, Any]) -> None:
        """Append and fsync: once this returns, the event survives a crash of the process or machine."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"received": time.time(), **event}, separators=(",", ":")) + "\n"
        path = self.path(pid)
        with _log_lock(path), path.open("ab") as out:
            out.write(line.encode())
            out.flush()
            os.fsync(out.fileno())

    def read_from(self, pid: str, offset: int) -> list[tuple[dict[str, Any], int]]:
        """Events after byte ``offset``, each with the offset just past it (a line still being
        written is left for the next call; an unreadable line is skipped). An offset past the end
        (the log was rotated) reads from the start."""
        path = self.path(pid)
        if not path.is_file():
            return []
        with path.open("rb") as source:
            size = source.seek(0, os.SEEK_END)
            source.seek(offset if offset <= size else 0)
            start = source.tell()
            data = source.read()
        events = []
        position = start
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            position += len(line)
            try:
                events.append((json.loads(line), position))
            except ValueError:
                continue  # a line cut short by a crash is skipped, the rest is kept
        return events

    def size(self, pid: str) -> int:
        try:
            return self.path(pid).stat().st_size
        except OSError:
            return 0

    def rotate(self, pid: str, processed: int) -> bool:
        """Move the log aside if every byte of it (``processed``) is folded in and it is large;
        True when it moved (then reading starts again at offset 0)."""
        path = self.path(pid)
        with _log_lock(path):
            if processed < self.ROTATE_BYTES or self.size(pid) != processed:
                return False
            os.replace(path, path.with_name(path.name + ".1"))
            return True
