"""One SAM engine per process and configuration, shared by the server and in-process jobs."""

from __future__ import annotations

import threading

from usam_backend.sam.engine import SamEngine
from usam_backend.settings import Settings

compute_lock = threading.Lock()
"""Held around model computation so the server's predictions and an in-process training job take
turns instead of fighting over the same cores and memory."""

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
