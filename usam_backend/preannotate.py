"""Batch pre-annotation: a whole project's tasks, in chunks, as jobs that write predictions back.

``usam preannotate --project ID`` lists the project's tasks through Label Studio's API, keeps
those without a prediction of the current ``model_version``, and queues them in chunks of
``USAM_PREANNOTATE_CHUNK`` tasks. Each chunk job (any number of ``usam worker`` processes run them,
on as many GPUs) predicts its tasks and posts each prediction to ``/api/predictions/``, checking
first that the task still lacks one: so re-running the command, or a job, resumes where it
stopped. Without ``REDIS_URL`` the chunks run in the command's own process.

``/predict`` hands the tasks it cannot finish within ``USAM_PREDICT_BUDGET`` seconds to the same
jobs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx

from usam_backend.errors import UsamError
from usam_backend.label_config import parse_label_config
from usam_backend.projects import ProjectRecord
from usam_backend.settings import Settings
from usam_backend.task_images import LabelStudioAuth

log = logging.getLogger("usam.preannotate")

PAGE_SIZE = 100


class LabelStudioApiError(UsamError):
    """Label Studio's API answered with an error or could not be reached."""


class LabelStudioApi:
    """The few Label Studio API calls batch pre-annotation needs (legacy token or PAT)."""

    def __init__(self, url: str, auth: LabelStudioAuth, client: httpx.Client, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.auth = auth
        self.client = client
        self.timeout = timeout

    @classmethod
    def for_project(cls, settings: Settings, record: ProjectRecord | None, client: httpx.Client) -> LabelStudioApi:
        url = settings.label_studio_url or (record.hostname if record else None)
        if not url:
            raise LabelStudioApiError("Label Studio's URL is unknown: set LABEL_STUDIO_URL")
        token = record.access_token if record else None
        if not (settings.label_studio_api_key or token):
            raise LabelStudioApiError("no Label Studio token: set LABEL_STUDIO_API_KEY")
        return cls(url, LabelStudioAuth(url, settings.label_studio_api_key, token, client), client)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.url}{path}"
        for attempt in (0, 1):
            try:
                response = self.client.request(
                    method, url, headers=self.auth.header(renew=attempt == 1), timeout=self.timeout, **kwargs
                )
            except httpx.HTTPError as exc:
                raise LabelStudioApiError(f"Label Studio at {self.url} is unreachable: {exc}") from None
            if response.status_code == 401 and attempt == 0:
                continue  # an expired access token: renew once
            if response.status_code >= 400:
                raise LabelStudioApiError(
                    f"Label Studio answered {method} {path} with HTTP {response.status_code}: {response.text[:200]}"
                )
            return response.json() if response.content else None
        raise LabelStudioApiError(f"Label Studio refused the token for {method} {path} (HTTP 401)")

    def project(self, pid: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/projects/{pid}/"))

    def tasks(self, pid: str) -> Iterator[dict[str, Any]]:
        """Every task of the project (id, data, and the model versions of its predictions)."""
        page = 1
        while True:
            params = {"project": pid, "page": page, "page_size": PAGE_SIZE, "fields": "all"}
            try:
                body = self.request("GET", "/api/tasks/", params=params)
            except LabelStudioApiError as exc:
                if "HTTP 404" in str(exc) and page > 1:
                    return  # past the last page
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            if len(tasks) < PAGE_SIZE:
                return
            page += 1

    def task(self, task_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/tasks/{task_id}/"))

    def prediction_versions(self, task_id: int) -> set[str]:
        found = self.request("GET", "/api/predictions/", params={"task": task_id})
        return {str(p.get("model_version")) for p in found or [] if isinstance(p, dict)}

    def create_prediction(self, pid: str, task_id: int, prediction: dict[str, Any]) -> None:
        self.request("POST", "/api/predictions/", json={"task": task_id, "project": int(pid), **prediction})


def versions_of(task: dict[str, Any]) -> set[str]:
    """Model versions of a listed task's predictions (the list API gives them one way or another)."""
    found = {str(p.get("model_version")) for p in task.get("predictions") or [] if isinstance(p, dict)}
    found |= {str(v) for v in task.get("predictions_model_versions") or []}
    return found


def chunk_job_id(pid: str, version: str, task_ids: list[int]) -> str:
    digest = hashlib.sha256(f"{pid}/{version}/{','.join(map(str, task_ids))}".encode()).hexdigest()[:16]
    return f"usam-preannotate-{pid}-{digest}"


def chunks(task_ids: list[int], size: int) -> list[list[int]]:
    return [task_ids[i : i + size] for i in range(0, len(task_ids), size)]


def submit_chunks(
    settings: Settings, runner: Any, pid: str, labels: list[str], task_ids: list[int], *, trigger: str,
    version: str = "current",
) -> list[str]:  # fmt: skip
    """Queue chunk jobs for these tasks; returns their job ids (idempotent per chunk)."""
    ids = []
    for part in chunks(task_ids, settings.preannotate_chunk):
        request = {"labels": labels, "project": pid, "trigger": trigger, "kind": "preannotate",
                   "extra": {"tasks": part}}  # fmt: skip
        job_id = chunk_job_id(pid, version, part)
        runner.submit(request, job_id, force=True)  # a finished chunk re-run skips what it did
        ids.append(job_id)
    return ids


_BACKENDS: dict[int, Any] = {}


def use_backend(backend: Any) -> None:
    """Let jobs that run inside ``usam serve`` (the in-process runner) share its backend."""
    _BACKENDS[id(backend.settings)] = backend


def preannotate_chunk(settings: Settings, project: str, task_ids: list[int], progress: Any = None) -> dict[str, Any]:
    """Predict these tasks with the project's current head and post what is missing.

    Returns counts: ``predicted``, ``skipped`` (already had the current version), ``failed``
    (tasks whose image could not be used). Label Studio's API failing fails the job.
    """
    from usam_backend.backend import Backend

    backend = _BACKENDS.get(id(settings)) or _BACKENDS.setdefault(id(settings), Backend(settings))
    record = backend.projects.get(project)
    if record is None:
        raise UsamError(f"project {project} is unknown here: run /setup or usam preannotate first")
    config = parse_label_config(record.label_config)
    choice = backend.registry.choose(config, project)
    if choice is None:
        raise UsamError(f"no head serves the labels of project {project} yet")
    counts = {"predicted": 0, "skipped": 0, "failed": 0, "model_version": choice.version}
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        fetcher = backend._fetcher(record)
        for task_id in task_ids:
            try:
                if choice.version in api.prediction_versions(task_id):
                    counts["skipped"] += 1
                else:
                    task = api.task(task_id)
                    result = backend.predict_task(task, config, choice, fetcher, None, project)
                    api.create_prediction(project, task_id, result)
                    counts["predicted"] += 1
            except LabelStudioApiError:
                raise
            except UsamError as exc:
                counts["failed"] += 1
                log.warning("project %s task %s: not pre-annotated: %s", project, task_id, exc)
            if progress is not None:
                progress.advance()
    return counts


def wait_for(runner: Any, job_ids: list[str], total: int, *, poll: float = 1.0, timeout: float | None = None) -> list[
    dict[str, Any]
]:  # fmt: skip
    """Show one progress bar over the tasks of these jobs until they all end; returns the jobs."""
    from tqdm.auto import tqdm

    wanted = set(job_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=total, desc="pre-annotating", unit="task")
    try:
        while True:
            jobs = runner.get(job_ids)
            done = sum(int((j.get("progress") or {}).get("done") or 0) for j in jobs)
            bar.update(max(0, done - bar.n))
            if len(jobs) == len(wanted) and all(j["status"] in ("finished", "failed", "stale") for j in jobs):
                bar.update(total - bar.n if all(j["status"] == "finished" for j in jobs) else 0)
                return jobs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("pre-annotation jobs still running")
            time.sleep(poll)
    finally:
        bar.close()


class _Bar:
    """Adapts a tqdm bar to the ``advance()`` of :class:`training.progress.Progress`."""

    def __init__(self, bar: Any):
        self.bar = bar

    def advance(self, count: int = 1) -> None:
        self.bar.update(count)


def run_preannotate(settings: Settings, project: str, *, wait: bool = True, timeout: float | None = None) -> int:
    """``usam preannotate``: returns the exit status (0: every task has a current prediction)."""
    from tqdm.auto import tqdm

    from usam_backend.projects import ProjectStore, project_id
    from usam_backend.registry import HeadRegistry
    from usam_backend.runners import make_runner

    pid = project_id(project)
    store = ProjectStore(settings.model_dir / "projects")
    record = store.get(pid)
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        schema = str(api.project(pid).get("label_config") or "")
        record = ProjectRecord(pid, schema, record.hostname if record else api.url,
                               record.access_token if record else None)  # fmt: skip
        store.put(record)  # the workers read the label config and Label Studio's address from here
        config = parse_label_config(schema)
        choice = HeadRegistry(settings.model_dir / "heads", settings.sam_type).choose(config, pid)
        if choice is None:
            raise UsamError(
                f"no head serves the labels of project {pid} ({', '.join(config.label_values)}): train one first "
                f"(usam train-labels {' '.join(config.label_values)}), or connect the backend and let it train"
            )
        listed = list(api.tasks(pid))
    todo = sorted(int(t["id"]) for t in listed if choice.version not in versions_of(t))
    print(f"project {pid}: {len(todo)} of {len(listed)} task(s) lack a {choice.version} prediction")
    if not todo:
        return 0
    runner = make_runner(settings)
    labels = sorted(config.label_values)
    if runner.kind == "embedded":  # no Redis: this process does the work
        totals = {"predicted": 0, "skipped": 0, "failed": 0}
        with tqdm(total=len(todo), desc="pre-annotating", unit="task") as bar:
            for part in chunks(todo, settings.preannotate_chunk):
                counts = preannotate_chunk(settings, pid, part, _Bar(bar))
                for key in totals:
                    totals[key] += int(counts[key])
        print(f"predicted {totals['predicted']}, already done {totals['skipped']}, failed {totals['failed']}")
        return 1 if totals["failed"] else 0
    job_ids = submit_chunks(settings, runner, pid, labels, todo, trigger="usam preannotate", version=choice.version)
    print(f"queued {len(job_ids)} job(s) of up to {settings.preannotate_chunk} tasks on {settings.queue}")
    if not wait:
        return 0
    jobs = wait_for(runner, job_ids, len(todo), timeout=timeout)
    results = [j.get("result") or {} for j in jobs]
    predicted = sum(int(r.get("predicted", 0)) for r in results)
    skipped = sum(int(r.get("skipped", 0)) for r in results)
    failed_tasks = sum(int(r.get("failed", 0)) for r in results)
    failed_jobs = [j for j in jobs if j["status"] != "finished"]
    print(f"predicted {predicted}, already done {skipped}, failed {failed_tasks}")
    for job in failed_jobs:
        print(f"job {job['id']} {job['status']}: {job.get('error')}")
    return 1 if failed_jobs or failed_tasks else 0
