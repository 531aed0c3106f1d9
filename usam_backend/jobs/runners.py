"""Where jobs run: RQ workers through Redis, or a thread inside the server.

``REDIS_URL`` set: jobs go to the ``USAM_QUEUE`` queue and ``usam worker`` processes (any number,
on any machine sharing the Redis and ``USAM_MODEL_DIR``) run them. Unset: an in-process runner
runs them one at a time in a background thread, so ``make serve`` needs no Redis.

Runners know no job kinds: a :class:`JobSpec` names its function by dotted path and carries plain
data; either runner imports the function and calls it as ``function(settings, request,
publish=...)`` (:func:`run_function`). Submitting is idempotent: a job that is queued or running
is never queued twice; a failed one is retried only when asked (``force``) or after
``RETRY_FAILED_AFTER`` seconds.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from usam_backend.core.errors import UsamError
from usam_backend.core.fetch import redact_url
from usam_backend.core.settings import Settings, get_settings

log = logging.getLogger("usam.runner")

RETRY_FAILED_AFTER = 600.0
KEEP_ENDED = 200  # ended jobs the in-process runner remembers
LISTED = 50  # jobs /jobs lists, newest first
HEARTBEAT_SECONDS = 15.0
STALE_AFTER = 120.0  # a started job whose heartbeat is older lost its worker
DOWN_BACKOFF = 10.0  # after Redis failed, don't try it again for this long
ACTIVE = ("queued", "started", "deferred", "scheduled")


Publish = Callable[[dict[str, Any]], None]
"""Where a job reports its progress (a snapshot dict: stage, done, total)."""


class RunnerUnavailable(UsamError):
    """The job queue cannot be reached (Redis down)."""


class JobTimeout(UsamError):
    """A job ran past ``USAM_JOB_TIMEOUT``."""


@dataclass(frozen=True)
class JobSpec:
    """A job to run: ``function`` (dotted path of a top-level function taking ``settings``,
    ``request`` and ``publish``) on ``request`` (plain data: ids, paths, labels, recipe).

    ``request`` may carry ``labels``, ``project`` and ``trigger``: they are shown in ``/jobs``.
    ``rerun_after``: a job that finished may run again after this many seconds (else only when forced).
    """

    id: str
    function: str
    request: dict[str, Any]
    kind: str
    description: str
    rerun_after: float | None = None


def run_function(function: str, settings: Settings, request: dict[str, Any], publish: Publish | None) -> Any:
    """Import a job function by dotted path and run it (both runners do this)."""
    module, _, name = function.rpartition(".")
    return getattr(importlib.import_module(module), name)(settings, request, publish=publish)


def rq_entry(function: str, request: dict[str, Any]) -> Any:
    """What RQ workers run: settings from this worker's environment; progress and a heartbeat go
    into the job's meta (the heartbeat tells the server a worker is still on it)."""
    meta = JobMeta(get_current_job())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            meta.save()

    meta.save()
    threading.Thread(target=beat, name="usam-heartbeat", daemon=True).start()
    try:
        return run_function(function, get_settings(), request, lambda snapshot: meta.save(progress=snapshot))
    finally:
        stop.set()


class JobMeta:
    """A running job's progress and heartbeat, saved into its meta in Redis.

    A save that Redis refuses (a restart, a network blip) neither fails the job nor stops the
    heartbeat: the meta is kept here and the next save carries it. An outage is logged when it
    starts and when it ends, not at every beat."""

    def __init__(self, job: Job | None):
        self.job = job
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def save(self, **values: Any) -> None:
        if self.job is None:
            return
        with self._lock:
            self.job.meta.update(values, heartbeat=time.time())
            try:
                self.job.save_meta()
            except (RedisError, OSError) as exc:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "job %s: cannot save its heartbeat and progress to Redis (%s); the job goes on and "
                        "saves them again when Redis answers", self.job.id, exc,
                    )  # fmt: skip
                return
            if self._down_since is not None:
                log.info(
                    "job %s: Redis answers again after %.0f s; heartbeat and progress saved",
                    self.job.id, time.monotonic() - self._down_since,
                )  # fmt: skip
                self._down_since = None


@dataclass
class JobInfo:
    id: str
    labels: list[str]
    project: str | None
    trigger: str
    kind: str = "labels"
    status: str = "queued"
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    result: dict[str, Any] | None = None
    enqueued_at: float = field(default_factory=time.time)
    ended_at: float | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class Runner(Protocol):
    kind: str

    def submit(self, spec: JobSpec, *, force: bool = False) -> JobInfo: ...

    def jobs(self) -> list[dict[str, Any]]: ...

    def get(self, job_ids: list[str]) -> list[dict[str, Any]]: ...

    def fault(self) -> str | None: ...


def should_resubmit(status: str, ended_at: float | None, *, force: bool, rerun_after: float | None = None) -> bool:
    if status in ACTIVE:
        return False
    if status == "failed":
        return force or ended_at is None or time.time() - ended_at > RETRY_FAILED_AFTER
    if force:
        return True
    # finished: a head is published (only Start training retrains), unless the job may be re-run
    return rerun_after is not None and (ended_at is None or time.time() - ended_at > rerun_after)


class EmbeddedRunner:
    """Runs jobs one at a time in a daemon thread of this process."""

    kind = "embedded"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._jobs: dict[str, JobInfo] = {}
        self._specs: dict[str, JobSpec] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, spec: JobSpec, *, force: bool = False) -> JobInfo:
        with self._lock:
            known = self._jobs.get(spec.id)
            if known is not None and not should_resubmit(
                known.status, known.ended_at, force=force, rerun_after=spec.rerun_after
            ):
                return known
            info = _new_info(spec.id, spec.request, spec.kind)
            self._jobs[spec.id] = info
            self._specs[spec.id] = spec
            self._queue.put(spec.id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="usam-training", daemon=True)
                self._thread.start()
            log.info("queued %s: %s", spec.id, spec.description)
            return info

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [info.public() for info in sorted(self._jobs.values(), key=lambda j: -j.enqueued_at)][:LISTED]

    def fault(self) -> str | None:
        return None

    def wait(self, timeout: float) -> None:
        """Block until every queued job has run (tests, scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(job["status"] not in ACTIVE for job in self.jobs()):
                return
            time.sleep(0.05)
        raise TimeoutError("training jobs still running")

    def get(self, job_ids: list[str]) -> list[dict[str, Any]]:
        with self._lock:
            return [self._jobs[j].public() for j in job_ids if j in self._jobs]

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            info = self._jobs[job_id]
            info.status = "started"

            deadline = time.monotonic() + self.settings.job_timeout

            def publish(snapshot: dict[str, Any], info: JobInfo = info, deadline: float = deadline) -> None:
                info.progress = snapshot
                if time.monotonic() > deadline:  # the job stops at its next progress report
                    raise JobTimeout(f"the job ran past USAM_JOB_TIMEOUT={self.settings.job_timeout} s")

            try:
                spec = self._specs[job_id]
                info.result = run_function(spec.function, self.settings, spec.request, publish)
                info.status = "finished"
            except UsamError as exc:
                info.status, info.error = "failed", str(exc)
                log.error("job %s failed: %s", job_id, exc)
            except Exception as exc:  # a bug must not kill the runner thread
                info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            info.ended_at = time.time()
            self._forget_old()

    def _forget_old(self) -> None:
        """Keep the table bounded: the :data:`KEEP_ENDED` most recently ended jobs, and all others."""
        with self._lock:
            ended = sorted((j for j in self._jobs.values() if j.ended_at is not None), key=lambda j: j.ended_at or 0)
            for job in ended[: max(0, len(ended) - KEEP_ENDED)]:
                del self._jobs[job.id]
                self._specs.pop(job.id, None)


class RQRunner:
    """Submits jobs to an RQ queue; any number of ``usam worker`` processes run them."""

    kind = "rq"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url or "", socket_connect_timeout=1.0, socket_timeout=2.0)
        self.queue = Queue(settings.queue, connection=self.redis)
        self._fault: str | None = None
        self._failed_at = 0.0
        self._checked = 0.0

    def submit(self, spec: JobSpec, *, force: bool = False) -> JobInfo:
        job_id = spec.id
        if self._fault and time.monotonic() - self._failed_at < DOWN_BACKOFF:
            raise RunnerUnavailable(self._fault)
        try:
            try:
                job = Job.fetch(job_id, connection=self.redis)
                status, ended = _status(job), _timestamp(job.ended_at)
                if status == "stale":
                    job.delete()  # its worker died: run it again (it resumes from the files on disk)
                elif not should_resubmit(status, ended, force=force, rerun_after=spec.rerun_after):
                    return _info(job)
                else:
                    job.delete()
            except NoSuchJobError:
                pass
            job = self.queue.enqueue(
                rq_entry,
                spec.function,
                spec.request,
                job_id=job_id,
                job_timeout=self.settings.job_timeout,
                result_ttl=7 * 86400,
                failure_ttl=7 * 86400,
                description=spec.description,
                meta={"request": spec.request, "kind": spec.kind},
            )
        except RedisError as exc:
            self._fault = f"Redis at {redact_url(self.settings.redis_url or '')} is unreachable: {exc}"
            self._failed_at = time.monotonic()
            raise RunnerUnavailable(self._fault) from None
        self._fault = None
        log.info("queued %s on %s: %s", job_id, self.settings.queue, spec.description)
        return _info(job)

    def jobs(self) -> list[dict[str, Any]]:
        try:
            ids = self.queue.get_job_ids(0, LISTED)  # the next to run
            for registry in (
                self.queue.started_job_registry, self.queue.finished_job_registry, self.queue.failed_job_registry
            ):  # fmt: skip
                ids += registry.get_job_ids(0, LISTED - 1, desc=True)  # the newest of each
            jobs = [job for job in Job.fetch_many(list(dict.fromkeys(ids)), connection=self.redis) if job]
        except RedisError as exc:
            self._fault = f"Redis at {redact_url(self.settings.redis_url or '')} is unreachable: {exc}"
            return []
        return [_info(job).public() for job in sorted(jobs, key=lambda j: j.enqueued_at or 0, reverse=True)[:LISTED]]

    def get(self, job_ids: list[str]) -> list[dict[str, Any]]:
        """These jobs (those that still exist), however many."""
        try:
            found = []
            for start in range(0, len(job_ids), 500):
                found += [j for j in Job.fetch_many(job_ids[start : start + 500], connection=self.redis) if j]
        except RedisError as exc:
            raise RunnerUnavailable(
                f"Redis at {redact_url(self.settings.redis_url or '')} is unreachable: {exc}"
            ) from None
        return [_info(job).public() for job in found]

    def fault(self) -> str | None:
        if time.monotonic() - self._checked > 5.0:
            self._checked = time.monotonic()
            try:
                self.redis.ping()
                self._fault = None
            except RedisError as exc:
                self._fault = f"Redis at {redact_url(self.settings.redis_url or '')} is unreachable: {exc}"
        return self._fault


def make_runner(settings: Settings) -> Runner:
    return RQRunner(settings) if settings.redis_url else EmbeddedRunner(settings)


def _status(job: Any) -> str:
    status = str(job.get_status(refresh=False) or "queued")
    status = status.split(".")[-1].lower()
    heartbeat = (job.meta or {}).get("heartbeat")
    if status == "started" and heartbeat is not None and time.time() - float(heartbeat) > STALE_AFTER:
        return "stale"
    return status


def _new_info(job_id: str, request: dict[str, Any], kind: str) -> JobInfo:
    return JobInfo(
        job_id, [str(label) for label in request.get("labels") or []], request.get("project"),
        request.get("trigger", "manual"), kind,
    )  # fmt: skip


def _info(job: Any) -> JobInfo:
    meta = job.meta or {}
    request = meta.get("request") or {}
    status = _status(job)
    error = None
    if status == "failed":
        error = _last_line(job)
    elif status == "stale":
        error = "its worker stopped (no heartbeat); submit again to resume"
    result = job.return_value(refresh=False) if status == "finished" else None
    return JobInfo(
        id=job.id,
        labels=list(request.get("labels", [])),
        project=request.get("project"),
        trigger=request.get("trigger", "manual"),
        kind=meta.get("kind", "job"),
        status=status,
        progress=dict((job.meta or {}).get("progress") or {}),
        error=error,
        result=result if isinstance(result, dict) else None,
        enqueued_at=_timestamp(job.enqueued_at) or 0.0,
        ended_at=_timestamp(job.ended_at),
    )


def _last_line(job: Any) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
    except Exception:  # older results may be unreadable; the status alone still helps
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    kind, _, message = lines[-1].partition(": ")  # "usam_backend.core.errors.DataError: ..." -> "DataError: ..."
    return f"{kind.rsplit('.', 1)[-1]}: {message}" if message else lines[-1]


def _timestamp(value: Any) -> float | None:
    return value.timestamp() if value is not None else None
