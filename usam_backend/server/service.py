"""The ML backend's service, independent of the web framework: parse, call, format.

Each endpoint reads the request, asks the pieces below and answers:

- project records and webhook events: :mod:`usam_backend.labelstudio.projects`;
- which head serves a project: :mod:`usam_backend.registry`;
- task in, prediction out: :class:`~usam_backend.labelstudio.tasks.TaskPredictor`;
- what to train and when, and the hand-off of a batch that runs out of time:
  :class:`~usam_backend.jobs.policy.TrainingPolicy`, on a runner (:mod:`usam_backend.jobs.runners`).

The SAM engine loads lazily, once per process, on the first prediction (or in the background
when the server starts); /health, /setup and /webhook never wait for it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from usam_backend.core.fetch import redact_url
from usam_backend.core.settings import Settings
from usam_backend.jobs.policy import TrainingPolicy
from usam_backend.jobs.runners import make_runner
from usam_backend.labelstudio.config import LabelConfigError, parse_label_config
from usam_backend.labelstudio.feedback import ANNOTATION_ACTIONS, FeedbackStore
from usam_backend.labelstudio.interactive import PromptError
from usam_backend.labelstudio.media import TaskImageFetcher, fetcher_for
from usam_backend.labelstudio.projects import EventLog, ProjectRecord, ProjectStore, UnknownProjectError, project_id
from usam_backend.labelstudio.results import prediction
from usam_backend.labelstudio.sequences import OutOfTime
from usam_backend.labelstudio.tasks import TaskPredictor
from usam_backend.registry import HeadRegistry, no_head_version
from usam_backend.sam.models import resolve_device
from usam_backend.sam.shared import LazyEngine, compute_lock

log = logging.getLogger("usam.backend")


@dataclass
class PredictRequest:
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Backend:
    """What the HTTP app calls: one per server process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = HeadRegistry(settings.model_dir / "heads", settings.sam_type)
        self.projects = ProjectStore(settings.model_dir / "projects")
        self.events = EventLog(settings.model_dir / "events")
        self.feedback = FeedbackStore.for_settings(settings)
        self.failures: deque[dict[str, Any]] = deque(maxlen=20)
        self.http = httpx.Client(follow_redirects=False)
        self.runner = make_runner(settings)
        self.sam = LazyEngine(settings)
        self.tasks = TaskPredictor(settings, self.sam.get, self.feedback, compute_lock, self._failed)
        self.policy = TrainingPolicy(settings, self.runner, self.registry, self.projects, self.feedback, self.sam)
        self.warnings: list[str] = []  # shown in /health: exposure without authentication, ...

    def warm_up(self) -> None:
        """At start-up: load SAM in the background so the first prediction does not pay for it,
        and fold in annotation events a stopped server answered but had not processed."""
        self.sam.warm_up()
        self.policy.resume(self.projects.ids())

    # -- endpoints -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        engine = self.sam.engine
        sam: dict[str, Any] = {"type": self.settings.sam_type, "loaded": engine is not None}
        if engine is not None:
            sam.update(
                device=str(engine.device),
                weights=engine.sam.weights,
                random_weights=engine.sam.random_weights,
                encoder_passes=engine.encoder_calls,
                cached_embeddings=len(engine.cache),
            )
        else:
            sam["device"] = str(resolve_device(self.settings.device))
        if self.sam.error:
            sam["error"] = self.sam.error
        heads = [
            {"version": info.version, "classes": list(info.class_names), "file": info.path.name}
            for info in self.registry.infos()
        ]
        return {
            "status": "UP",
            "model_class": "usam",
            "sam": sam,
            "heads": heads,
            "unusable_heads": self.registry.problems(),
            "projects": {pid: self._project_status(pid) for pid in self.projects.ids()},
            "training": self.training_status(limit=5),
            "recent_failures": list(self.failures),
            "warnings": list(self.warnings),
        }

    def training_status(self, limit: int = 50) -> dict[str, Any]:
        status: dict[str, Any] = {"runner": self.runner.kind, "auto_train": self.settings.auto_train}
        fault = self.runner.fault()
        if fault:
            status["fault"] = fault
        status["jobs"] = self.runner.jobs()[:limit]
        return status

    def setup(
        self, project: str, schema: str, hostname: str | None, access_token: str | None, *,
        trust_hostname: bool = False,
    ) -> str:  # fmt: skip
        """Record the project; answer the model version serving its labels.

        ``trust_hostname``: use ``hostname`` as Label Studio's URL (with this /setup's token only)
        when ``LABEL_STUDIO_URL`` is unset. The HTTP app grants it to authenticated /setup calls and
        to a server listening on loopback only (:func:`usam_backend.server.app.create_app`)."""
        config = parse_label_config(schema)
        pid = project_id(project)
        trusted = bool(hostname) and trust_hostname and not self.settings.label_studio_url
        if hostname and not trusted and not self.settings.label_studio_url:
            log.warning(
                "project %s: not using the /setup hostname %s (the call was not authenticated and usam listens "
                "beyond loopback): set LABEL_STUDIO_URL", project_id(project), redact_url(hostname),
            )  # fmt: skip
        self.projects.put(ProjectRecord(pid, schema, hostname, access_token, hostname_trusted=trusted))
        choice = self.registry.choose(config.labels, pid)
        version = choice.version if choice else no_head_version(self.settings.sam_type)
        log.info("setup project %s: labels %s -> %s", pid, list(config.label_values), version)
        self.policy.labels_seen(pid, config, "setup")
        return version

    def versions(self) -> list[str]:
        return self.registry.versions()

    def webhook(self, payload: dict[str, Any]) -> str:
        """Record the event, then act on it off the request thread."""
        action = str(payload.get("action") or "")
        project = payload.get("project")
        pid_source = project.get("id") if isinstance(project, dict) else project
        if pid_source is None:
            return action
        pid = project_id(pid_source)
        known = self.projects.get(pid)
        schema = project.get("label_config") if isinstance(project, dict) else None
        if action == "PROJECT_UPDATED" and schema:
            hostname, token = (known.hostname, known.access_token) if known else (None, None)
            trusted = known.hostname_trusted if known else False
            self.projects.put(ProjectRecord(pid, str(schema), hostname, token, hostname_trusted=trusted))
        event: dict[str, Any] = {key: payload[key] for key in ("annotation", "task", "annotations") if key in payload}
        self.events.append(pid, {"action": action, **event})
        if action in (*ANNOTATION_ACTIONS, "ANNOTATIONS_DELETED"):
            self.policy.annotations_changed(pid)
        schema = schema or (known.label_config if known else None)
        if action in ("PROJECT_UPDATED", "START_TRAINING") and schema:
            try:
                config = parse_label_config(str(schema))
            except LabelConfigError as exc:
                log.info("project %s: not training: %s", pid, exc)
                return action
            if action == "START_TRAINING":
                self.policy.start_training(pid, config)
            else:
                self.policy.labels_seen(pid, config, "project_updated")
        return action

    def predict(self, request: PredictRequest) -> list[Any]:
        """One element per task: a prediction, or ``[]`` (no prediction yet) for tasks handed off
        to pre-annotation jobs because the batch ran out of time (``USAM_PREDICT_BUDGET``), and
        for every video task (video jobs post their predictions)."""
        started = time.monotonic()
        pid = project_id(request.project) if request.project else None
        record = self.projects.get(pid) if pid else None
        schema = request.label_config or (record.label_config if record else None)
        if not schema:
            raise UnknownProjectError(
                f"project {request.project!r} is unknown and the request has no label_config: Label Studio calls "
                "/setup first"
            )
        config = parse_label_config(schema)
        choice = self.registry.choose(config.labels, pid)
        fetcher = self.fetcher(record)
        basic = _basic_auth(request.params)
        context = request.params.get("context") if isinstance(request.params, dict) else None
        if isinstance(context, dict) and context.get("result"):
            if len(request.tasks) != 1:
                raise PromptError("an interactive request must hold exactly one task")
            version = choice.version if choice else no_head_version(self.settings.sam_type)
            return [self.tasks.interactive(request.tasks[0], context["result"], config, fetcher, basic, version)]
        if choice is None:
            log.info("no head serves labels %s yet: empty predictions", list(config.label_values))
            return [prediction([], no_head_version(self.settings.sam_type)) for _ in request.tasks]
        if config.videos:  # always longer than Label Studio waits: jobs post the predictions
            ids = [int(t["id"]) for t in request.tasks if isinstance(t.get("id"), int)]
            if pid is not None and ids:
                self.policy.hand_off(pid, config, ids, choice.version)
                log.info("project %s: %d video task(s) handed to video jobs", pid, len(ids))
            return [[] for _ in request.tasks]
        results: list[Any] = []
        deadline = started + self.settings.predict_budget
        for i, task in enumerate(request.tasks):
            try:
                if i and time.monotonic() > deadline:
                    raise OutOfTime
                results.append(self.tasks.predict(task, config, choice, fetcher, basic, pid, deadline=deadline))
            except OutOfTime:  # the rest of the batch, this task included, goes to pre-annotation jobs
                rest = request.tasks[i:]
                log.warning(
                    "predicted %d task(s) in USAM_PREDICT_BUDGET=%.0f s; %d left for pre-annotation jobs",
                    len(results), self.settings.predict_budget, len(rest),
                )  # fmt: skip
                ids = [int(t["id"]) for t in rest if isinstance(t.get("id"), int)]
                if pid is not None and ids:
                    self.policy.hand_off(pid, config, ids, choice.version)
                results += [[] for _ in rest]
                break
        return results

    # -- helpers -----------------------------------------------------------------------------------

    def fetcher(self, record: ProjectRecord | None) -> TaskImageFetcher:
        """Task images of a project: Label Studio's address and token from its record."""
        return fetcher_for(self.settings, record, self.http)

    def _failed(self, task_id: object, reason: str) -> None:
        self.failures.append({"time": time.time(), "task": task_id, "reason": reason})

    def _project_status(self, pid: str) -> dict[str, Any]:
        record = self.projects.get(pid)
        if record is None:
            return {"error": "unreadable project record"}
        try:
            config = parse_label_config(record.label_config)
        except LabelConfigError as exc:
            return {"error": str(exc)}
        choice = self.registry.choose(config.labels, pid)
        status: dict[str, Any] = {"labels": list(config.label_values), "feedback": self.feedback.summary(pid)}
        if choice is None:
            status.update(model_version=no_head_version(self.settings.sam_type), head=None,
                          why=f"no head in {self.registry.folder} knows any of these labels")  # fmt: skip
        else:
            status.update(model_version=choice.version, head=choice.path.name, missing_labels=list(choice.missing))
            if choice.missing:
                status["why"] = f"the head does not know {', '.join(choice.missing)}: those labels are not predicted"
        return status


def _basic_auth(params: dict[str, Any]) -> tuple[str, str] | None:
    login, password = params.get("login"), params.get("password")
    return (str(login), str(password)) if login and password else None
