"""Batch pre-annotation: a whole project's tasks, in chunks, as jobs that write predictions back.

``usam preannotate --project ID`` lists the project's tasks through Label Studio's API, keeps
those without a prediction of the current ``model_version``, and queues them in chunks of
``USAM_PREANNOTATE_CHUNK`` tasks. Each chunk job (any number of ``usam worker`` processes run them,
on as many GPUs) predicts its tasks and posts each prediction to Label Studio, checking first that
the task still lacks one: so re-running the command, or a job, resumes where it stopped. Without
``REDIS_URL`` the chunks run in the command's own process.

``/predict`` hands the tasks it cannot finish within ``USAM_PREDICT_BUDGET`` seconds to the same
jobs (:meth:`usam_backend.jobs.policy.TrainingPolicy.hand_off`).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from training.progress import Progress
from usam_backend.core.errors import UsamError
from usam_backend.core.settings import Settings
from usam_backend.jobs.batches import run_task_jobs
from usam_backend.jobs.policy import VideoShape, preannotate_jobs, video_task_jobs
from usam_backend.jobs.runners import Publish
from usam_backend.labelstudio.client import LabelStudioApi, LabelStudioApiError, versions_of
from usam_backend.labelstudio.config import LabelConfig, parse_label_config
from usam_backend.labelstudio.feedback import FeedbackStore
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.labelstudio.projects import ProjectRecord, ProjectStore, project_id
from usam_backend.labelstudio.tasks import TaskPredictor
from usam_backend.registry import HeadChoice, HeadRegistry
from usam_backend.sam.shared import compute_lock, shared_engine

log = logging.getLogger("usam.preannotate")


def serving(
    settings: Settings, project: str, version: str | None = None
) -> tuple[ProjectRecord, LabelConfig, HeadChoice]:  # fmt: skip
    """A project's record (read fresh: it follows PROJECT_UPDATED), label config and serving head;
    with ``version``, the head of that model version while it is on disk (else the serving one).

    Raises:
        UsamError: the project is unknown here, or no head serves its labels yet.
    """
    record = ProjectStore(settings.model_dir / "projects").get(project)
    if record is None:
        raise UsamError(f"project {project} is unknown here: run /setup or usam preannotate first")
    config = parse_label_config(record.label_config)
    registry = HeadRegistry(settings.model_dir / "heads", settings.sam_type)
    choice = registry.choose_version(config.labels, version, project) if version else None
    choice = choice or registry.choose(config.labels, project)
    if choice is None:
        raise UsamError(f"no head serves the labels of project {project} yet")
    return record, config, choice


def preannotate_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """Predict ``request["tasks"]`` of ``request["project"]`` with the project's current head and
    post the predictions Label Studio lacks.

    Returns counts: ``predicted``, ``skipped`` (already had the current version), ``failed``
    (tasks whose image could not be used). Label Studio's API failing fails the job.
    """
    project = str(request["project"])
    task_ids = [int(t) for t in request.get("tasks") or []]
    progress = Progress(publish)
    progress.stage("pre-annotating", len(task_ids))
    record, config, choice = serving(settings, project)
    predictor = TaskPredictor(settings, lambda: shared_engine(settings), FeedbackStore.for_settings(settings),
                              compute_lock)  # fmt: skip
    counts: dict[str, Any] = {"predicted": 0, "skipped": 0, "failed": 0, "model_version": choice.version}
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        fetcher = fetcher_for(settings, record, client)
        for task_id in task_ids:
            try:
                if choice.version in api.prediction_versions(task_id):
                    counts["skipped"] += 1
                else:
                    task = api.task(task_id)
                    result = predictor.predict(task, config, choice, fetcher, None, project)
                    api.create_prediction(project, task_id, result)
                    counts["predicted"] += 1
            except LabelStudioApiError:
                raise
            except UsamError as exc:
                counts["failed"] += 1
                log.warning("project %s task %s: not pre-annotated: %s", project, task_id, exc)
            progress.advance()
    progress.close()
    return counts


def run_preannotate(settings: Settings, project: str, *, wait: bool = True, timeout: float | None = None) -> int:
    """``usam preannotate``: returns the exit status (0: every task has a current prediction)."""
    pid = project_id(project)
    store = ProjectStore(settings.model_dir / "projects")
    record = store.get(pid)
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        schema = str(api.project(pid).get("label_config") or "")
        record = ProjectRecord(pid, schema, record.hostname if record else api.url,
                               record.access_token if record else None,
                               hostname_trusted=record.hostname_trusted if record else False)  # fmt: skip
        store.put(record)  # the workers read the label config and Label Studio's address from here
        config = parse_label_config(schema)
        choice = HeadRegistry(settings.model_dir / "heads", settings.sam_type).choose(config.labels, pid)
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
    if config.videos:
        specs = video_task_jobs(pid, todo, trigger="usam preannotate", version=choice.version,
                                shape=VideoShape.from_settings(settings))  # fmt: skip
    else:
        specs = preannotate_jobs(pid, sorted(config.label_values), todo, chunk=settings.preannotate_chunk,
                                 trigger="usam preannotate", version=choice.version)  # fmt: skip
    outcome = run_task_jobs(settings, specs, total=len(todo), desc="pre-annotating", wait=wait, timeout=timeout)
    if outcome is None:
        return 0
    totals = outcome.totals
    failed_jobs = f", {len(outcome.failed_jobs)} job(s) failed" if outcome.failed_jobs else ""
    print(f"predicted {totals['predicted']}, already done {totals['skipped']}, failed {totals['failed']}{failed_jobs}")
    for job in outcome.failed_jobs:
        print(f"job {job['id']} {job['status']}: {job.get('error')}")
    return 1 if outcome.failed_jobs or totals["failed"] else 0
