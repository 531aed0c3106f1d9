"""Job progress: the current stage and how far it is, for logs and for whoever watches the job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

Publish = Callable[[dict[str, Any]], None]


class Progress:
    """Tracks ``stage``, ``done`` and ``total``; pushes a snapshot to ``publish`` (RQ job meta, or
    the in-process runner's status) at most every ``interval`` seconds and at every stage change,
    and shows a progress bar in the log."""

    def __init__(self, publish: Publish | None = None, *, interval: float = 1.0, bars: bool = True):
        self.publish = publish
        self.interval = interval
        self.bars = bars
        self.stage_name = ""
        self.done = 0
        self.total: int | None = None
        self._last = 0.0
        self._bar: Any = None

    def stage(self, name: str, total: int | None = None) -> None:
        self._close_bar()
        self.stage_name, self.done, self.total = name, 0, total
        self._bar = tqdm(total=total, desc=name, unit="it", disable=not self.bars, leave=False)
        self._push(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        self._push()

    def snapshot(self) -> dict[str, Any]:
        return {"stage": self.stage_name, "done": self.done, "total": self.total}

    def close(self) -> None:
        self._close_bar()
        self._push(force=True)

    def _push(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.publish is not None and (force or now - self._last >= self.interval):
            self._last = now
            self.publish(self.snapshot())

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
