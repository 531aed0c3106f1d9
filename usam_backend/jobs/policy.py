"""When to train, and what: the one place that decides which jobs to queue.

- a project's labels have no head that serves them all (``/setup``, ``PROJECT_UPDATED``): a
  training job for that label set (``USAM_AUTO_TRAIN``);
- *Start training*: a job on the project's annotations when it has any, else on class images;
- every ``USAM_RETRAIN_EVERY`` new annotations: a job on the project's annotations;
- a ``/predict`` batch that runs out of time: pre-annotation jobs for the rest of its tasks;
- video tasks: always video jobs (a video takes longer than Label Studio waits).

Every job is a :class:`~usam_backend.jobs.runners.JobSpec` whose request is plain data (labels,
project id, task ids and the :class:`~training.recipe.Recipe` that shapes the head); its id names
what it computes, so however many triggers arrive, the same work is queued once. Submission runs
off the caller's thread: requests answer at once, also when Redis is down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from training.recipe import Recipe, label_set
from usam_backend.core.settings import Settings
from usam_backend.jobs.runners import RETRY_FAILED_AFTER, JobSpec, Runner, RunnerUnavailable
from usam_backend.labelstudio.config import LabelConfig, parse_label_config
from usam_backend.labelstudio.feedback import FeedbackStore, TaskFeedback
from usam_backend.labelstudio.projects import ProjectStore
from usam_backend.registry import HeadRegistry
from usam_backend.sam.models import expected_fingerprint, resolve_device
from usam_backend.sam.shared import LazyEngine

log = logging.getLogger("usam.policy")

FEEDBACK_RETRY_SECONDS = 30.0

JOBS = {
    "labels": "usam_backend.jobs.training.train_labels_job",
    "feedback": "usam_backend.jobs.training.train_feedback_job",
    "preannotate": "usam_backend.jobs.preannotate.preannotate_job",
    "refine": "usam_backend.jobs.refine.refine_job",
    "video": "usam_backend.jobs.video.video_task_job",
    "video-chunk": "usam_backend.jobs.video.video_chunk_job",
}
"""The job table: kind -> the top-level function a runner calls."""


def recipe_for(settings: Settings, engine: LazyEngine | None = None) -> Recipe:
    """The recipe this process would train with: its settings and its SAM weights (from the
    loaded engine if any, else from the checkpoint on disk)."""
    loaded = engine.engine if engine is not None else None
    fingerprint = loaded.sam.fingerprint if loaded is not None else None
    if fingerprint is None:
        fingerprint = expected_fingerprint(settings.sam_type, settings.sam_checkpoint, settings.cache_dir)
    cuda = resolve_device(settings.device).type == "cuda"
    return Recipe.from_settings(settings, cuda=cuda, sam_fingerprint=fingerprint)


def labels_job(recipe: Recipe, labels: list[str], *, project: str | None, trigger: str) -> JobSpec:
    """Train a head on class images of ``labels``; shared by every project with these labels."""
    request = {"labels": sorted(labels), "project": project, "trigger": trigger, "recipe": recipe.to_dict()}
    return JobSpec(
        id="usam-train-" + recipe.digest(*label_set(labels)),
        function=JOBS["labels"],
        request=request,
        kind="labels",
        description=f"train a usam head on {', '.join(sorted(labels))}",
    )


def feedback_job(
    recipe: Recipe, project: str, labels: list[str], tasks: list[TaskFeedback], *, trigger: str
) -> JobSpec:
    """Train a project's head on class images plus its annotated tasks (named by their content)."""
    digest = hashlib.sha256("\x1f".join(t.digest() for t in tasks).encode()).hexdigest()[:16]
    request = {"labels": sorted(labels), "project": project, "trigger": trigger, "recipe": recipe.to_dict()}
    return JobSpec(
        id="usam-feedback-" + recipe.digest(*label_set(labels), f"feedback/{project}/{digest}"),
        function=JOBS["feedback"],
        request=request,
        kind="feedback",
        description=f"train a usam head on project {project}'s annotations and {', '.join(sorted(labels))}",
    )


def preannotate_jobs(
    project: str, labels: list[str], task_ids: list[int], *, chunk: int, trigger: str, version: str = "current"
) -> list[JobSpec]:
    """Pre-annotate these tasks in chunks of ``chunk`` (one job each, idempotent per chunk)."""
    specs = []
    for start in range(0, len(task_ids), chunk):
        part = task_ids[start : start + chunk]
        digest = hashlib.sha256(f"{project}/{version}/{','.join(map(str, part))}".encode()).hexdigest()[:16]
        specs.append(
            JobSpec(
                id=f"usam-preannotate-{project}-{digest}",
                function=JOBS["preannotate"],
                request={"labels": sorted(labels), "project": project, "trigger": trigger, "tasks": part},
                kind="preannotate",
                description=f"pre-annotate {len(part)} task(s) of project {project}",
            )
        )
    return specs


@dataclass(frozen=True)
class VideoShape:
    """The settings that shape a video's prediction; they travel in the video's job requests.

    Attributes:
        stride: the head runs on every ``stride``-th frame (``USAM_VIDEO_STRIDE``) and each chunk's last.
        chunk: frames per chunk job (``USAM_VIDEO_CHUNK``).
        max_frames: a longer video is refused (``USAM_VIDEO_MAX_FRAMES``, source frames).
        max_pixels: larger frames are refused (``USAM_MAX_IMAGE_PIXELS``).
    """

    stride: int
    chunk: int
    max_frames: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoShape:
        return cls(settings.video_stride, settings.video_chunk, settings.video_max_frames, settings.max_image_pixels)

    @classmethod
    def from_request(cls, request: dict[str, Any], settings: Settings) -> VideoShape:
        """The shape a job was given (a request from before shapes travelled: this worker's settings)."""
        given = request.get("shape")
        return cls(**{k: int(v) for k, v in given.items()}) if isinstance(given, dict) else cls.from_settings(settings)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def video_task_jobs(
    project: str, task_ids: list[int], *, trigger: str, version: str, shape: VideoShape
) -> list[JobSpec]:  # fmt: skip
    """One job per video task (it splits a long video into chunk jobs itself), named by the head's
    version and the settings that shape the result.
    A video job that ended, well or not, runs again only after ``RETRY_FAILED_AFTER`` (a bad
    video is not downloaded again on every ``/predict``)."""
    digest = hashlib.sha256(f"{version}/{shape.digest()}".encode()).hexdigest()[:8]
    return [
        JobSpec(
            id=f"usam-video-{project}-{task_id}-{digest}",
            function=JOBS["video"],
            request={
                "project": project,
                "trigger": trigger,
                "tasks": [task_id],
                "shape": shape.to_dict(),
                "version": version,
            },
            kind="video",
            description=f"find and track objects in video task {task_id} of project {project}",
            rerun_after=RETRY_FAILED_AFTER,
        )
        for task_id in task_ids
    ]


def video_chunk_jobs(
    project: str, task_id: int, chunks: list[tuple[int, int]], *, version: str, shape: VideoShape
) -> list[JobSpec]:  # fmt: skip
    """One job per chunk of frames of a video task."""
    digest = hashlib.sha256(f"{version}/{shape.digest()}".encode()).hexdigest()[:8]
    return [
        JobSpec(
            id=f"usam-video-{project}-{task_id}-{digest}-{start}",
            function=JOBS["video-chunk"],
            request={
                "project": project,
                "tasks": [task_id],
                "start": start,
                "stop": stop,
                "chunks": chunks,
                "version": version,
                "shape": shape.to_dict(),
            },
            kind="video",
            description=f"frames {start}-{stop - 1} of video task {task_id} of project {project}",
        )
        for start, stop in chunks
    ]


class TrainingPolicy:
    """Decides what to queue on the server's events; submits off the request thread."""

    def __init__(
        self, settings: Settings, runner: Runner, registry: HeadRegistry, projects: ProjectStore,
        feedback: FeedbackStore, engine: LazyEngine,
    ):  # fmt: skip
        self.settings = settings
        self.runner = runner
        self.registry = registry
        self.projects = projects
        self.feedback = feedback
        self.engine = engine
        self._submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usam-submit")

    def labels_seen(self, pid: str, config: LabelConfig, trigger: str) -> None:
        """A project's labels were set or changed: train them if no head serves them all."""
        if not self.settings.auto_train:
            return
        choice = self.registry.choose(config.labels, pid)
        if choice is None or choice.missing:
            self._later(self._train_labels, pid, config, trigger, False)

    def start_training(self, pid: str, config: LabelConfig) -> None:
        """*Start training*: learn from the project's annotations if it has any, else class images."""
        self._later(self._start_training, pid, config)

    def annotations_changed(self, pid: str) -> None:
        """New annotation events: fold them into feedback; retrain every ``USAM_RETRAIN_EVERY``."""
        self._later(self._take_feedback, pid)

    def hand_off(self, pid: str, config: LabelConfig, task_ids: list[int], version: str) -> None:
        """Tasks a ``/predict`` batch had no time for (every video task): pre-annotation jobs post
        their predictions (``version``: the head serving the project)."""
        if config.videos:
            shape = VideoShape.from_settings(self.settings)
            specs = video_task_jobs(pid, task_ids, trigger="predict", version=version, shape=shape)
            self._later(self._submit_all, pid, specs, False)
            return
        else:
            specs = preannotate_jobs(pid, sorted(config.label_values), task_ids,
                                     chunk=self.settings.preannotate_chunk, trigger="predict")  # fmt: skip
        self._later(self._submit_all, pid, specs)

    def drain(self) -> None:
        """Wait until every submission asked for so far has been made (tests, shutdown)."""
        self._submitter.submit(lambda: None).result()

    # -- on the submitter thread -------------------------------------------------------------------

    def _later(self, function: Any, *args: Any) -> Future[None]:
        return self._submitter.submit(function, *args)

    def _train_labels(self, pid: str, config: LabelConfig, trigger: str, force: bool) -> None:
        spec = labels_job(recipe_for(self.settings, self.engine), list(config.label_values), project=pid,
                          trigger=trigger)  # fmt: skip
        self._submit(pid, spec, force=force)

    def _start_training(self, pid: str, config: LabelConfig) -> None:
        try:
            self.feedback.catch_up(pid)
            if not self._train_on_feedback(pid, config, "start_training", force=True):
                self._train_labels(pid, config, "start_training", True)
        except Exception:  # a background task: log, never raise into the executor
            log.exception("project %s: training not started", pid)

    def resume(self, pids: list[str]) -> None:
        """At start-up: fold in events a stopped server answered but had not processed yet."""
        for pid in pids:
            self.annotations_changed(pid)

    def _take_feedback(self, pid: str) -> None:
        try:
            state = self.feedback.catch_up(pid)
            if state.error:  # an event failed: it stays first in line, try again later
                timer = threading.Timer(FEEDBACK_RETRY_SECONDS, self.annotations_changed, [pid])
                timer.daemon = True
                timer.start()
            every = self.settings.retrain_every
            if every and state.since_training >= every:
                self._train_on_feedback(pid, None, f"{state.since_training} new annotations", force=False)
        except Exception:
            log.exception("project %s: feedback not processed", pid)

    def _train_on_feedback(self, pid: str, config: LabelConfig | None, trigger: str, *, force: bool) -> bool:
        """Queue a feedback job for the project; False when it has no annotated task yet."""
        tasks = self.feedback.tasks(pid)
        record = self.projects.get(pid)
        if not tasks or (config is None and record is None):
            return False
        config = config or parse_label_config(record.label_config)  # type: ignore[union-attr]
        spec = feedback_job(recipe_for(self.settings, self.engine), pid, list(config.label_values), tasks,
                            trigger=trigger)  # fmt: skip
        if self._submit(pid, spec, force=force):
            self.feedback.training_queued(pid)
        return True

    def _submit_all(self, pid: str, specs: list[JobSpec], force: bool = True) -> None:
        for spec in specs:
            if not self._submit(pid, spec, force=force):  # a finished chunk re-run skips what it did
                log.error("project %s: the rest of the batch was not handed off; run Retrieve predictions again", pid)
                return

    def _submit(self, pid: str, spec: JobSpec, *, force: bool) -> bool:
        try:
            self.runner.submit(spec, force=force)
            return True
        except RunnerUnavailable as exc:
            log.error("project %s: %s not queued: %s", pid, spec.kind, exc)
        except Exception:  # never let a submission problem escape into the submitter
            log.exception("project %s: %s not queued", pid, spec.kind)
        return False
