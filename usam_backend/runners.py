"""Where training jobs run: RQ workers through Redis, or a thread inside the server.

``REDIS_URL`` set: jobs go to the ``USAM_QUEUE`` queue and ``usam worker`` processes (any number,
on any machine sharing the Redis and ``USAM_MODEL_DIR``) run them. Unset: an in-process runner
runs them one at a time in a background thread, so ``make serve`` needs no Redis. The same job
function (:func:`training.jobs.run_job`) runs either way.

Submitting is idempotent: a job id names a label set under given settings, and a job that is
queued or running is never queued twice; a failed one is retried only when asked (Start
training) or after ``RETRY_FAILED_AFTER`` seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from usam_backend.errors import UsamError
from usam_backend.settings import Settings

log = logging.getLogger("usam.runner")

RETRY_FAILED_AFTER = 600.0
STALE_AFTER = 120.0  # a started job whose heartbeat (every 15 s, training.jobs) is older lost its worker
DOWN_BACKOFF = 10.0  # after Redis failed, don't try it again for this long
ACTIVE = ("queued", "started", "deferred", "scheduled")


class RunnerUnavailable(UsamError):
    """The job queue cannot be reached (Redis down)."""


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

    def submit(self, request: dict[str, Any], job_id: str, *, force: bool = False) -> JobInfo: ...

    def jobs(self) -> list[dict[str, Any]]: ...

    def get(self, job_ids: list[str]) -> list[dict[str, Any]]: ...

    def fault(self) -> str | None: ...


def should_resubmit(status: str, ended_at: float | None, *, force: bool) -> bool:
    if status in ACTIVE:
        return False
    if status == "failed":
        return force or ended_at is None or time.time() - ended_at > RETRY_FAILED_AFTER
    return force  # finished: its head is published; only Start training retrains


class EmbeddedRunner:
    """Runs jobs one at a time in a daemon thread of this process."""

    kind = "embedded"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._jobs: dict[str, JobInfo] = {}
        self._requests: dict[str, dict[str, Any]] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, request: dict[str, Any], job_id: str, *, force: bool = False) -> JobInfo:
        with self._lock:
            known = self._jobs.get(job_id)
            if known is not None and not should_resubmit(known.status, known.ended_at, force=force):
                return known
            info = JobInfo(
                job_id, list(request["labels"]), request.get("project"), request.get("trigger", "manual"),
                request.get("kind", "labels"),
            )  # fmt: skip
            self._jobs[job_id] = info
            self._requests[job_id] = request
            self._queue.put(job_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="usam-training", daemon=True)
                self._thread.start()
            log.info("queued %s for %s", job_id, info.labels)
            return info

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [info.public() for info in sorted(self._jobs.values(), key=lambda j: -j.enqueued_at)]

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
        from training.jobs import execute

        while True:
            job_id = self._queue.get()
            info = self._jobs[job_id]
            info.status = "started"

            def publish(snapshot: dict[str, Any], info: JobInfo = info) -> None:
                info.progress = snapshot

            try:
                info.result = execute(self.settings, self._requests[job_id], publish=publish)
                info.status = "finished"
            except UsamError as exc:
                info.status, info.error = "failed", str(exc)
                log.error("training %s failed: %s", job_id, exc)
            except Exception as exc:  # a bug must not kill the runner thread
                info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("training %s failed:\n%s", job_id, traceback.format_exc())
            info.ended_at = time.time()


class RQRunner:
    """Submits jobs to an RQ queue; any number of ``usam worker`` processes run them."""

    kind = "rq"

    def __init__(self, settings: Settings):
        from redis import Redis
        from rq import Queue

        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url or "", socket_connect_timeout=1.0, socket_timeout=2.0)
        self.queue = Queue(settings.queue, connection=self.redis)
        self._fault: str | None = None
        self._failed_at = 0.0
        self._checked = 0.0

    def submit(self, request: dict[str, Any], job_id: str, *, force: bool = False) -> JobInfo:
        from redis.exceptions import RedisError
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if self._fault and time.monotonic() - self._failed_at < DOWN_BACKOFF:
            raise RunnerUnavailable(self._fault)
        try:
            try:
                job = Job.fetch(job_id, connection=self.redis)
                status, ended = _status(job), _timestamp(job.ended_at)
                if status == "stale":
                    job.delete()  # its worker died: run it again (it resumes from the files on disk)
                elif not should_resubmit(status, ended, force=force):
                    return _info(job)
                else:
                    job.delete()
            except NoSuchJobError:
                pass
            job = self.queue.enqueue(
                "training.jobs.run_job",
                request,
                job_id=job_id,
                job_timeout=self.settings.job_timeout,
                result_ttl=7 * 86400,
                failure_ttl=7 * 86400,
                description=_describe(request),
                meta={"request": request},
            )
        except RedisError as exc:
            self._fault = f"Redis at {_safe_url(self.settings.redis_url)} is unreachable: {exc}"
            self._failed_at = time.monotonic()
            raise RunnerUnavailable(self._fault) from None
        self._fault = None
        log.info("queued %s on %s for %s", job_id, self.settings.queue, request["labels"])
        return _info(job)

    def jobs(self) -> list[dict[str, Any]]:
        from redis.exceptions import RedisError
        from rq.job import Job

        try:
            ids = list(self.queue.job_ids)
            for registry in (
                self.queue.started_job_registry, self.queue.finished_job_registry, self.queue.failed_job_registry
            ):  # fmt: skip
                ids += registry.get_job_ids()
            jobs = [job for job in Job.fetch_many(list(dict.fromkeys(ids)), connection=self.redis) if job]
        except RedisError as exc:
            self._fault = f"Redis at {_safe_url(self.settings.redis_url)} is unreachable: {exc}"
            return []
        return [_info(job).public() for job in sorted(jobs, key=lambda j: j.enqueued_at or 0, reverse=True)[:50]]

    def get(self, job_ids: list[str]) -> list[dict[str, Any]]:
        """These jobs (those that still exist), however many."""
        from redis.exceptions import RedisError
        from rq.job import Job

        try:
            found = []
            for start in range(0, len(job_ids), 500):
                found += [j for j in Job.fetch_many(job_ids[start : start + 500], connection=self.redis) if j]
        except RedisError as exc:
            raise RunnerUnavailable(f"Redis at {_safe_url(self.settings.redis_url)} is unreachable: {exc}") from None
        return [_info(job).public() for job in found]

    def fault(self) -> str | None:
        from redis.exceptions import RedisError

        if time.monotonic() - self._checked > 5.0:
            self._checked = time.monotonic()
            try:
                self.redis.ping()
                self._fault = None
            except RedisError as exc:
                self._fault = f"Redis at {_safe_url(self.settings.redis_url)} is unreachable: {exc}"
        return self._fault


def _describe(request: dict[str, Any]) -> str:
    kind = request.get("kind", "labels")
    if kind == "preannotate":
        tasks = (request.get("extra") or {}).get("tasks", [])
        return f"pre-annotate {len(tasks)} task(s) of project {request.get('project')}"
    what = f"project {request.get('project')}'s annotations and " if kind == "feedback" else ""
    return f"train a usam head on {what}{', '.join(request['labels'])}"


def make_runner(settings: Settings) -> Runner:
    return RQRunner(settings) if settings.redis_url else EmbeddedRunner(settings)


def _status(job: Any) -> str:
    status = str(job.get_status(refresh=False) or "queued")
    status = status.split(".")[-1].lower()
    heartbeat = (job.meta or {}).get("heartbeat")
    if status == "started" and heartbeat is not None and time.time() - float(heartbeat) > STALE_AFTER:
        return "stale"
    return status


def _info(job: Any) -> JobInfo:
    request = (job.meta or {}).get("request") or {}
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
        kind=request.get("kind", "labels"),
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
    kind, _, message = lines[-1].partition(": ")  # "usam_backend.errors.DataError: ..." -> "DataError: ..."
    return f"{kind.rsplit('.', 1)[-1]}: {message}" if message else lines[-1]


def _timestamp(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def _safe_url(url: str | None) -> str:
    """The Redis URL without a password."""
    if not url or "@" not in url:
        return url or ""
    scheme, rest = url.split("://", 1) if "://" in url else ("redis", url)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
