"""A job function for the runner tests (runners import job functions by dotted path)."""

from __future__ import annotations

import time
from typing import Any

from training.progress import Progress


def slow_job(settings: Any, request: dict[str, Any], *, publish: Any = None) -> dict[str, Any]:
    progress = Progress(publish, interval=0.1, bars=False)
    progress.stage("sleeping", 100)
    deadline = time.monotonic() + float(request["seconds"])
    while time.monotonic() < deadline:
        time.sleep(0.05)
        progress.advance()
    return {"slept": request["seconds"]}
