"""Measuring where time and memory go: per-stage wall clock and peak memory of a block."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import TracebackType

import torch


class StageTimer:
    """Accumulates wall-clock seconds per named stage.

    With ``sync`` the CUDA stream is synchronised at stage edges so GPU work is charged to the
    stage that queued it (costs throughput; for benchmarks only).
    """

    def __init__(self, sync: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync and torch.cuda.is_available()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] += time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def release_free_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS starts from what is in use."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting level while the block runs.

    Host memory is sampled (RSS, every ``interval`` seconds); on CUDA the allocator's peak is
    read as well. Use as ``with PeakMemory() as peak: ...`` then ``peak.host_bytes``.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.host_bytes = 0
        self.cuda_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self._baseline = self._peak = resident_bytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_baseline = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, resident_bytes())
        self.host_bytes = max(0, self._peak - self._baseline)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_bytes = max(0, torch.cuda.max_memory_allocated() - self._cuda_baseline)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, resident_bytes())
