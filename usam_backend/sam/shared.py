"""One SAM engine per process and configuration, shared by the server and the jobs it runs."""

from __future__ import annotations

import logging
import threading
import time

from usam_backend.core.errors import UsamError
from usam_backend.core.settings import Settings
from usam_backend.sam.engine import SamEngine

log = logging.getLogger("usam.sam")


class FairLock:
    """A lock granted in the order it was asked for. A video job takes it for one frame at a time;
    with ``threading.Lock`` the job could take it straight back after each frame while a request
    that was already waiting never gets it. Not re-entrant."""

    def __init__(self) -> None:
        self._turns = threading.Condition(threading.Lock())
        self._issued = 0  # tickets handed out
        self._serving = 0  # the ticket that may hold the lock

    def acquire(self) -> None:
        with self._turns:
            ticket = self._issued
            self._issued += 1
            self._turns.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._turns:
            self._serving += 1
            self._turns.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


compute_lock = FairLock()
"""Held around model computation so the server's predictions and in-process jobs take turns
(first come, first served) instead of fighting over the same cores and memory; long work takes
it per frame or per image."""

RETRY_SECONDS = 60.0
"""After a failed load, how long :class:`LazyEngine` answers with the same error."""

_engines: dict[tuple[object, ...], SamEngine] = {}
_lock = threading.Lock()


def shared_engine(settings: Settings) -> SamEngine:
    """The engine for these settings, built on first use (loading weights) and reused after."""
    key = (
        settings.sam_type,
        settings.sam_checkpoint,
        settings.device,
        settings.cache_dir,
        settings.embedding_cache_size,
        settings.embedding_cache_disk,
        settings.decode_chunk,
    )
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = SamEngine.from_settings(settings)
        return engine


class LazyEngine:
    """The shared engine, loaded on first use or in the background; a failed load is remembered for
    :data:`RETRY_SECONDS` so a burst of requests does not retry a broken download each time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: SamEngine | None = None
        self.error: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    def get(self) -> SamEngine:
        with self._lock:
            if self.engine is None:
                if self.error and time.monotonic() - self._failed_at < RETRY_SECONDS:
                    raise UsamError(self.error)
                try:
                    self.engine = shared_engine(self.settings)
                except UsamError as exc:
                    self.error, self._failed_at = str(exc), time.monotonic()
                    raise
                self.error = None
                sam = self.engine.sam
                log.info("SAM %s loaded on %s (%s)", sam.sam_type, self.engine.device, sam.weights)
            return self.engine

    def warm_up(self) -> threading.Thread:
        """Load in the background so the first prediction does not pay for it."""

        def load() -> None:
            try:
                self.get()
            except UsamError as exc:
                log.error("SAM could not be loaded: %s", exc)

        thread = threading.Thread(target=load, name="usam-warm-up", daemon=True)
        thread.start()
        return thread
