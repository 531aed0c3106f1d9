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
    id: str
    label_config: str
    hostname: str | None = None
    access_token: str | None = None
    updated: float = 0.0


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


class EventLog:
    """Append-only webhook events per project."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()

    def append(self, pid: str, event: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"received": time.time(), **event}, separators=(",", ":"))
        with self._lock, (self.folder / f"{pid}.jsonl").open("a") as out:
            out.write(line + "\n")

    def read(self, pid: str) -> list[dict[str, Any]]:
        return self.read_from(pid, 0)[0]

    def read_from(self, pid: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Events after byte ``offset``, and the offset after the last complete line read (a line
        still being written is left for the next call; an unreadable line is skipped)."""
        path = self.folder / f"{pid}.jsonl"
        if not path.is_file():
            return [], offset
        with path.open("rb") as source:
            source.seek(offset)
            data = source.read()
        complete = data[: data.rfind(b"\n") + 1]
        events = []
        for line in complete.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash is skipped, the rest is kept
        return events, offset + len(complete)
