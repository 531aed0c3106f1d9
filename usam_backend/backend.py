"""The ML backend's behaviour, independent of the web framework: setup, predict, webhook, health.

The SAM engine loads lazily, once per process, on the first prediction (or in the background
when the server starts); /health, /setup and /webhook never wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from usam_backend.errors import UsamError
from usam_backend.feedback import ANNOTATION_ACTIONS, FeedbackStore, Region
from usam_backend.images import load_image
from usam_backend.inference import SemanticSegmenter
from usam_backend.label_config import LabelConfig, LabelConfigError, ProjectLabel, parse_label_config
from usam_backend.ls_predictions import brush_region, prediction, region_id
from usam_backend.masks import mask_to_rle
from usam_backend.preannotate import submit_chunks, use_backend
from usam_backend.projects import EventLog, ProjectRecord, ProjectStore, UnknownProjectError, project_id
from usam_backend.registry import HeadChoice, HeadRegistry, no_head_version
from usam_backend.runners import RunnerUnavailable, make_runner
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.models import resolve_device
from usam_backend.sam.shared import compute_lock, shared_engine
from usam_backend.settings import Settings
from usam_backend.task_images import TaskImageFetcher, fetcher_for

log = logging.getLogger("usam.backend")

MAX_SEGMENTERS = 4  # heads kept ready on the device at once
ENGINE_RETRY_SECONDS = 60.0  # after a failed load, how long to answer with the same error


class PromptError(UsamError):
    """An interactive request whose prompt cannot be turned into a mask."""


@dataclass
class PredictRequest:
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Backend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = HeadRegistry(settings.model_dir / "heads", settings.sam_type)
        self.projects = ProjectStore(settings.model_dir / "projects")
        self.events = EventLog(settings.model_dir / "events")
        self.feedback = FeedbackStore.for_settings(settings)
        self.failures: deque[dict[str, Any]] = deque(maxlen=20)
        self.http = httpx.Client(follow_redirects=False)
        self.runner = make_runner(settings)
        self._submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usam-submit")
        self._engine: SamEngine | None = None
        self._engine_error: str | None = None
        self._engine_failed_at = 0.0
        self._engine_lock = threading.Lock()
        self._compute_lock = compute_lock  # one model computation at a time, in-process jobs included
        self._segmenters: dict[str, SemanticSegmenter] = {}
        use_backend(self)

    # -- the SAM engine --------------------------------------------------------------------------

    def engine(self) -> SamEngine:
        with self._engine_lock:
            if self._engine is None:
                if self._engine_error and time.monotonic() - self._engine_failed_at < ENGINE_RETRY_SECONDS:
                    raise UsamError(self._engine_error)
                try:
                    self._engine = shared_engine(self.settings)
                except UsamError as exc:
                    self._engine_error, self._engine_failed_at = str(exc), time.monotonic()
                    raise
                self._engine_error = None
                log.info(
                    "SAM %s loaded on %s (%s)", self._engine.sam.sam_type, self._engine.device, self._engine.sam.weights
                )
            return self._engine

    def warm_up(self) -> threading.Thread:
        """Load the engine in the background so the first prediction does not pay for it."""

        def load() -> None:
            try:
                self.engine()
            except UsamError as exc:
                log.error("SAM could not be loaded: %s", exc)

        thread = threading.Thread(target=load, name="usam-warm-up", daemon=True)
        thread.start()
        return thread

    # -- endpoints -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        engine = self._engine
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
        if self._engine_error:
            sam["error"] = self._engine_error
        heads = [
            {"version": version, "classes": list(head.class_names), "file": path.name}
            for (path, head), version in zip(self.registry.heads(), self.registry.versions(), strict=True)
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
        }

    def training_status(self, limit: int = 50) -> dict[str, Any]:
        status: dict[str, Any] = {"runner": self.runner.kind, "auto_train": self.settings.auto_train}
        fault = self.runner.fault()
        if fault:
            status["fault"] = fault
        status["jobs"] = self.runner.jobs()[:limit]
        return status

    def setup(self, project: str, schema: str, hostname: str | None, access_token: str | None) -> str:
        config = parse_label_config(schema)
        pid = project_id(project)
        self.projects.put(ProjectRecord(pid, schema, hostname, access_token))
        choice = self.registry.choose(config, pid)
        version = choice.version if choice else no_head_version(self.settings.sam_type)
        log.info("setup project %s: labels %s -> %s", pid, list(config.label_values), version)
        if self.settings.auto_train and (choice is None or choice.missing):
            self._train_later(pid, config, "setup")
        return version

    def versions(self) -> list[str]:
        return self.registry.versions()

    def webhook(self, payload: dict[str, Any]) -> str:
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
            self.projects.put(ProjectRecord(pid, str(schema), hostname, token))
        event: dict[str, Any] = {key: payload[key] for key in ("annotation", "task", "annotations") if key in payload}
        self.events.append(pid, {"action": action, **event})
        if action in (*ANNOTATION_ACTIONS, "ANNOTATIONS_DELETED"):
            self._submitter.submit(self._take_feedback, pid)
        schema = schema or (known.label_config if known else None)
        if action in ("PROJECT_UPDATED", "START_TRAINING") and schema:
            try:
                config = parse_label_config(str(schema))
            except LabelConfigError as exc:
                log.info("project %s: not training: %s", pid, exc)
                return action
            if action == "START_TRAINING":
                self._submitter.submit(self._start_training, pid, config)
            elif self.settings.auto_train:
                choice = self.registry.choose(config, pid)
                if choice is None or choice.missing:
                    self._train_later(pid, config, "project_updated")
        return action

    def _take_feedback(self, pid: str) -> None:
        """Turn new annotation events into feedback; retrain every USAM_RETRAIN_EVERY annotations."""
        try:
            state = self.feedback.catch_up(pid)
            every = self.settings.retrain_every
            if every and state.since_training >= every:
                self._train_on_feedback(pid, None, f"{state.since_training} new annotations", force=False)
        except Exception:  # a background task: log, never raise into the executor
            log.exception("project %s: feedback not processed", pid)

    def _start_training(self, pid: str, config: LabelConfig) -> None:
        """Start training: learn from the project's annotations if it has any, else class images."""
        try:
            self.feedback.catch_up(pid)
            if not self._train_on_feedback(pid, config, "start_training", force=True):
                self._train(pid, config, "start_training", True)
        except Exception:
            log.exception("project %s: training not started", pid)

    def _train_on_feedback(self, pid: str, config: LabelConfig | None, trigger: str, *, force: bool) -> bool:
        """Queue a feedback job for the project; False when it has no annotated task yet."""
        from training.jobs import feedback_job_id

        tasks = self.feedback.tasks(pid)
        record = self.projects.get(pid)
        if not tasks or (config is None and record is None):
            return False
        config = config or parse_label_config(record.label_config)  # type: ignore[union-attr]
        labels = sorted(config.label_values)
        cuda = resolve_device(self.settings.device).type == "cuda"
        request = {"labels": labels, "project": pid, "trigger": trigger, "kind": "feedback"}
        try:
            self.runner.submit(request, feedback_job_id(self.settings, pid, labels, tasks, cuda=cuda), force=force)
        except RunnerUnavailable as exc:
            log.error("project %s: feedback training not queued: %s", pid, exc)
            return True
        self.feedback.training_queued(pid)
        return True

    def _train_later(self, pid: str, config: LabelConfig, trigger: str, *, force: bool = False) -> None:
        """Queue a training job for the config's labels without making the request wait for it."""
        self._submitter.submit(self._train, pid, config, trigger, force)

    def _train(self, pid: str, config: LabelConfig, trigger: str, force: bool) -> None:
        from training.jobs import job_id

        labels = sorted(config.label_values)
        cuda = resolve_device(self.settings.device).type == "cuda"
        request = {"labels": labels, "project": pid, "trigger": trigger}
        try:
            self.runner.submit(request, job_id(self.settings, labels, cuda=cuda), force=force)
        except RunnerUnavailable as exc:
            log.error("project %s: training not queued: %s", pid, exc)
        except Exception:  # never let a submission problem escape into a request thread
            log.exception("project %s: training not queued", pid)

    def predict(self, request: PredictRequest) -> list[Any]:
        """One element per task: a prediction, or ``[]`` (no prediction yet) for tasks handed off
        to pre-annotation jobs because the batch ran out of time (``USAM_PREDICT_BUDGET``)."""
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
        choice = self.registry.choose(config, pid)
        fetcher = self._fetcher(record)
        basic = _basic_auth(request.params)
        context = request.params.get("context") if isinstance(request.params, dict) else None
        if isinstance(context, dict) and context.get("result"):
            if len(request.tasks) != 1:
                raise PromptError("an interactive request must hold exactly one task")
            version = choice.version if choice else no_head_version(self.settings.sam_type)
            return [self._interactive(request.tasks[0], context["result"], config, fetcher, basic, version)]
        if choice is None:
            log.info("no head serves labels %s yet: empty predictions", list(config.label_values))
            return [prediction([], no_head_version(self.settings.sam_type)) for _ in request.tasks]
        results: list[Any] = []
        for i, task in enumerate(request.tasks):
            if i and time.monotonic() - started > self.settings.predict_budget:
                rest = request.tasks[i:]
                self._hand_off(pid, config, rest, len(results))
                results += [[] for _ in rest]
                break
            results.append(self.predict_task(task, config, choice, fetcher, basic, pid))
        return results

    def _hand_off(self, pid: str | None, config: LabelConfig, rest: list[dict[str, Any]], done: int) -> None:
        ids = [int(t["id"]) for t in rest if isinstance(t.get("id"), int)]
        log.warning(
            "predicted %d task(s) in USAM_PREDICT_BUDGET=%.0f s; %d left for pre-annotation jobs",
            done, self.settings.predict_budget, len(rest),
        )  # fmt: skip
        if pid is None or not ids:
            return

        def submit() -> None:
            try:
                submit_chunks(self.settings, self.runner, pid, sorted(config.label_values), ids, trigger="predict")
            except Exception:
                log.exception(
                    "project %s: the rest of the batch was not handed off; run Retrieve predictions again", pid
                )

        self._submitter.submit(submit)

    # -- prediction ------------------------------------------------------------------------------

    def predict_task(
        self, task: dict[str, Any], config: LabelConfig, choice: HeadChoice, fetcher: TaskImageFetcher,
        basic: tuple[str, str] | None = None, pid: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """A task's prediction (empty, with the reason logged, when its image cannot be used)."""
        task_id = task.get("id")
        results: list[dict[str, Any]] = []
        logged: list[Region] = []
        confidences: list[float] = []
        try:
            for image_name, field_ in config.images.items():
                image = self._task_image(task, field_.key, fetcher, basic)
                by_class: dict[int, ProjectLabel] = {}  # head class index -> the project label it predicts
                for label in config.labels_for_image(image_name):
                    if label.value in choice.served:
                        by_class.setdefault(choice.served[label.value], label)
                if not by_class:
                    continue
                head_classes = {choice.head.class_names[i] for i in by_class}
                with self._compute_lock:
                    regions = self._segmenter(choice).segment(image, classes=head_classes)
                confidences.append(regions.confidence)
                for i in range(len(regions)):
                    label = by_class[int(regions.class_ids[i])]
                    rid = region_id(choice.version, task_id, image_name, i)
                    score = float(regions.scores[i])
                    results.append(brush_region(regions.masks[i], label, score, rid))
                    logged.append(Region(rid, label.value, label.control, label.image, mask_to_rle(regions.masks[i]),
                                         score))  # fmt: skip
        except UsamError as exc:
            self._failed(task_id, str(exc))
            return prediction([], choice.version)
        if pid is not None and isinstance(task_id, int):
            try:
                self.feedback.record_prediction(pid, task_id, choice.version, logged)
            except OSError as exc:
                log.warning("task %s: prediction not logged for feedback: %s", task_id, exc)
        confidence = float(np.nanmean(confidences)) if confidences and not np.isnan(confidences).all() else None
        return prediction(results, choice.version, confidence)

    def _interactive(
        self, task: dict[str, Any], context: list[Any], config: LabelConfig, fetcher: TaskImageFetcher,
        basic: tuple[str, str] | None, version: str,
    ) -> dict[str, Any]:  # fmt: skip
        prompt = _prompt(context, config)
        field_ = config.images[prompt.image]
        image = self._task_image(task, field_.key, fetcher, basic)
        height, width = image.shape[:2]
        points = np.array([[x * width / 100, y * height / 100] for x, y in prompt.points], dtype=np.float32)
        box = None
        if prompt.box is not None:
            x, y, w, h = prompt.box
            box = np.array([x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100])
        engine = self.engine()
        with self._compute_lock:
            embedding = engine.embed(image)
            single_click = len(points) == 1 and box is None
            result = engine.predict_prompt(
                embedding,
                points=points if len(points) else None,
                labels=np.array(prompt.point_labels, dtype=np.int64),
                box=box,
                multimask=single_click,
            )
        best = int(np.argmax(result.iou_predictions))
        region = brush_region(
            result.masks[best],
            prompt.label,
            float(result.iou_predictions[best]),
            region_id(version, task.get("id"), "prompt"),
        )
        return prediction([region], version)

    def _segmenter(self, choice: HeadChoice) -> SemanticSegmenter:
        segmenter = self._segmenters.get(choice.version)
        if segmenter is None:
            s = self.settings
            segmenter = SemanticSegmenter(
                self.engine(), choice.head, points=s.points, score_threshold=s.score_threshold, nms_iou=s.nms_iou
            )
            recent = list(self._segmenters.items())[: MAX_SEGMENTERS - 1]
            self._segmenters = {choice.version: segmenter, **dict(recent)}
        return segmenter

    def _task_image(
        self, task: dict[str, Any], key: str, fetcher: TaskImageFetcher, basic: tuple[str, str] | None
    ) -> np.ndarray:
        data = task.get("data")
        if not isinstance(data, dict) or key not in data:
            raise UsamError(f"task {task.get('id')} has no '{key}' field in its data")
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        raw = fetcher.fetch(data[key], task_id, basic)
        return load_image(raw, max_pixels=self.settings.max_image_pixels)

    def _fetcher(self, record: ProjectRecord | None) -> TaskImageFetcher:
        return fetcher_for(self.settings, record.hostname if record else None,
                           record.access_token if record else None, self.http)  # fmt: skip

    def _failed(self, task_id: object, reason: str) -> None:
        log.warning("task %s: no prediction: %s", task_id, reason)
        self.failures.append({"time": time.time(), "task": task_id, "reason": reason})

    def _project_status(self, pid: str) -> dict[str, Any]:
        record = self.projects.get(pid)
        if record is None:
            return {"error": "unreadable project record"}
        try:
            config = parse_label_config(record.label_config)
        except LabelConfigError as exc:
            return {"error": str(exc)}
        choice = self.registry.choose(config, pid)
        status: dict[str, Any] = {"labels": list(config.label_values), "feedback": self.feedback.summary(pid)}
        if choice is None:
            status.update(model_version=no_head_version(self.settings.sam_type), head=None,
                          why=f"no head in {self.registry.folder} knows any of these labels")  # fmt: skip
        else:
            status.update(model_version=choice.version, head=choice.path.name, missing_labels=list(choice.missing))
            if choice.missing:
                status["why"] = f"the head does not know {', '.join(choice.missing)}: those labels are not predicted"
        return status


@dataclass(frozen=True)
class Prompt:
    label: Any  # ProjectLabel
    image: str
    points: list[tuple[float, float]]  # percent of width, height
    point_labels: list[int]  # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None  # x, y, width, height in percent


def _prompt(context: list[Any], config: LabelConfig) -> Prompt:
    """Smart-tool context (keypoints, a rectangle) -> SAM prompt and the brush label to emit."""
    points: list[tuple[float, float]] = []
    point_labels: list[int] = []
    box = None
    label = None
    image = None
    for item in context:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        kind, value = item.get("type"), item["value"]
        names = value.get(str(kind)) or []
        if kind not in ("keypointlabels", "rectanglelabels") or not names:
            continue
        image = image or item.get("to_name")
        label = label or config.brush_label(str(names[0]), str(item.get("to_name")))
        try:
            if kind == "keypointlabels":
                points.append((float(value["x"]), float(value["y"])))
                point_labels.append(0 if item.get("is_positive") is False else 1)
            else:
                box = (float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"]))
        except (KeyError, TypeError, ValueError):
            raise PromptError(f"a {kind} prompt lacks numeric x, y (and width, height)") from None
    if image is None or (not points and box is None):
        raise PromptError("the interactive context holds no keypoint or rectangle with a label")
    if image not in config.images:
        raise PromptError(f"the prompt is on {image!r}, which has no BrushLabels in the label config")
    if label is None:
        raise PromptError("the prompt's label has no BrushLabels label of the same name on this image")
    return Prompt(label, image, points, point_labels, box)


def _basic_auth(params: dict[str, Any]) -> tuple[str, str] | None:
    login, password = params.get("login"), params.get("password")
    return (str(login), str(password)) if login and password else None
