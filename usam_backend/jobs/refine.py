"""Refining another model's predictions: a project's brush, polygon, rectangle and ellipse
predictions of one model version, refined by SAM (UO-SAM), posted back under a new version.

``usam refine --project ID --from-version V`` lists the project's tasks, keeps those with a
prediction of version ``V`` and none of ``V+uosam`` yet, and refines them in chunks of
``USAM_PREANNOTATE_CHUNK`` tasks: as RQ jobs with ``REDIS_URL``, else in this process. A job
checks each task again before posting, so re-running resumes where it stopped. Regions of every
image shape are refined and posted in their own shape (a box becomes the tight box of its refined
mask), on single images and on each frame of a frame sequence; other results are carried over.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import httpx
import numpy as np

from training.progress import Progress
from usam_backend.core.errors import UsamError
from usam_backend.core.images import load_image
from usam_backend.core.settings import Settings
from usam_backend.jobs.batches import run_task_jobs
from usam_backend.jobs.policy import JOBS
from usam_backend.jobs.runners import JobSpec, Publish
from usam_backend.labelstudio.annotations import read_region
from usam_backend.labelstudio.client import LabelStudioApi, LabelStudioApiError
from usam_backend.labelstudio.config import SHAPE_TAGS, ProjectLabel, parse_label_config
from usam_backend.labelstudio.feedback import FeedbackStore
from usam_backend.labelstudio.media import TaskImageFetcher, fetcher_for
from usam_backend.labelstudio.projects import ProjectRecord, ProjectStore, project_id
from usam_backend.labelstudio.results import mask_results, prediction
from usam_backend.labelstudio.sequences import sequence_refs
from usam_backend.labelstudio.tasks import TaskPredictor
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.generator import AutomaticMasks
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.sam.shared import compute_lock, shared_engine
from usam_backend.systems.uosam import RefineReport, generator_options, refine_masks

log = logging.getLogger("usam.refine")


def refined_version(version: str) -> str:
    return f"{version}+uosam"


def refine_jobs(
    project: str, task_ids: list[int], from_version: str, *, chunk: int, use_global: bool, trigger: str
) -> list[JobSpec]:
    """Chunks of tasks to refine, one job each (idempotent per chunk)."""
    specs = []
    for start in range(0, len(task_ids), chunk):
        part = task_ids[start : start + chunk]
        digest = hashlib.sha256(f"{project}/{from_version}/{use_global}/{part}".encode()).hexdigest()[:16]
        request = {"project": project, "tasks": part, "from_version": from_version, "global": use_global,
                   "trigger": trigger, "labels": []}  # fmt: skip
        specs.append(
            JobSpec(
                f"usam-refine-{project}-{digest}",
                JOBS["refine"],
                request,
                "refine",
                f"refine {len(part)} task(s) of project {project} from {from_version}",
            )
        )
    return specs


def refine_job(settings: Settings, request: dict[str, Any], *, publish: Publish | None = None) -> dict[str, Any]:
    """Refine ``request["tasks"]``' predictions of ``from_version`` and post them as
    :func:`refined_version`. Returns counts: ``refined``, ``skipped`` (already refined, or no
    prediction to refine), ``failed`` (image or prediction unusable)."""
    project, source = str(request["project"]), str(request["from_version"])
    target = refined_version(source)
    task_ids = [int(t) for t in request.get("tasks") or []]
    progress = Progress(publish)
    progress.stage("refining", len(task_ids))
    record = ProjectStore(settings.model_dir / "projects").get(project)
    if record is None:
        raise UsamError(f"project {project} is unknown here: run usam refine --project {project} first")
    config = parse_label_config(record.label_config)
    engine = shared_engine(settings)
    tasks = TaskPredictor(settings, lambda: engine, FeedbackStore.for_settings(settings), compute_lock)
    generator = AutomaticMasks(engine, **generator_options(engine.device.type)) if request.get("global") else None
    counts: dict[str, Any] = {"refined": 0, "skipped": 0, "failed": 0, "model_version": target}
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, record, client)
        fetcher = fetcher_for(settings, record, client)
        for task_id in task_ids:
            try:
                found = {str(p.get("model_version")): p for p in api.predictions(task_id)}
                if target in found or source not in found:
                    counts["skipped"] += 1
                else:
                    task = api.task(task_id)
                    result = []
                    for image_name, field in config.images.items():
                        regions = [r for r in found[source].get("result") or [] if r.get("to_name") == image_name]
                        if field.sequence:
                            result += _refine_sequence(task, field.key, regions, tasks, fetcher, engine, generator)
                            continue
                        if not regions:
                            continue
                        image = tasks.task_image(task, field.key, fetcher, None)
                        with compute_lock:
                            result += refine_regions(image, regions, EnginePredictor(engine), generator)
                    score = found[source].get("score")
                    api.create_prediction(project, task_id, prediction(result, target, score))
                    counts["refined"] += 1
            except LabelStudioApiError:
                raise
            except UsamError as exc:
                counts["failed"] += 1
                log.warning("project %s task %s: not refined: %s", project, task_id, exc)
            progress.advance()
    progress.close()
    return counts


def _refine_sequence(
    task: dict[str, Any], key: str, regions: list[dict[str, Any]], tasks: TaskPredictor, fetcher: TaskImageFetcher,
    engine: SamEngine, generator: AutomaticMasks | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """A frame sequence's regions refined frame by frame (each frame fetched, checked and decoded
    only when it has regions), each keeping its ``item_index``."""
    refs = sequence_refs(task, key, tasks.limits)
    by_frame: dict[int, list[dict[str, Any]]] = {}
    for region in regions:
        frame = region.get("item_index", 0)
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < len(refs):
            raise UsamError(f"a predicted region is on frame {str(frame)[:20]} of a {len(refs)}-frame sequence")
        by_frame.setdefault(frame, []).append(region)
    out: list[dict[str, Any]] = []
    task_id = task.get("id") if isinstance(task.get("id"), int) else None
    for frame, on_frame in sorted(by_frame.items()):
        image = load_image(fetcher.fetch(refs[frame], task_id, None), max_pixels=tasks.settings.max_image_pixels)
        with compute_lock:
            out += refine_regions(image, on_frame, EnginePredictor(engine), generator, item_index=frame)
    return out


def refine_regions(
    image: np.ndarray, regions: list[dict[str, Any]], predictor: EnginePredictor, generator: AutomaticMasks | None,
    item_index: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One image's prediction regions refined: brush, polygon, rectangle and ellipse regions become
    one label map (region index + 1, later regions on top), refined, and are cut out again, each in
    its own shape (a polygon per part, the refined mask's tight box, its ellipse: the shapes of
    :func:`~usam_backend.labelstudio.results.mask_results`); other results are kept as they are."""
    height, width = image.shape[:2]
    shaped = [r for r in regions if str(r.get("type")) in SHAPE_TAGS.values()]
    others = [r for r in regions if str(r.get("type")) not in SHAPE_TAGS.values()]
    coarse = np.zeros((height, width), dtype=np.int32)
    labels: list[ProjectLabel] = []
    for index, region in enumerate(shaped, start=1):
        kind = str(region["type"])
        names = (region.get("value") or {}).get(kind) if isinstance(region.get("value"), dict) else None
        if not names:
            raise UsamError(f"a predicted {kind} region has no label")
        try:  # a region states its image's size; a polygon, box or ellipse is drawn at it
            read = read_region(region, str(names[0]), lambda *_: None)
        except (KeyError, TypeError, ValueError, UsamError) as exc:
            raise UsamError(f"a predicted {kind} region cannot be read: {exc}") from None
        if read.mask.shape != (height, width):
            raise UsamError(
                f"a predicted region is {read.mask.shape[1]}x{read.mask.shape[0]}, the image {width}x{height}"
            )
        coarse[read.mask] = index
        labels.append(ProjectLabel(str(names[0]), str(region.get("from_name")), str(region.get("to_name")), kind=kind))
    report = RefineReport()
    refined = refine_masks(image, coarse, predictor, generator=generator, report=report, ignore=None)
    out = []
    for index, (region, label) in enumerate(zip(shaped, labels, strict=True), start=1):
        rid, score = hashlib.sha1(f"{region.get('id')}+uosam".encode()).hexdigest()[:10], region.get("score")
        for part in mask_results(refined == index, label, float(score or 0.0), rid, item_index):
            if score is None:
                del part["score"]
            out.append(part)
    return out + others


def run_refine_project(
    settings: Settings, project: str, from_version: str, *, use_global: bool = False, wait: bool = True,
    timeout: float | None = None,
) -> int:  # fmt: skip
    """``usam refine --project``: returns the exit status (0: every task with a ``from_version``
    prediction has a refined one)."""
    pid = project_id(project)
    target = refined_version(from_version)
    store = ProjectStore(settings.model_dir / "projects")
    known = store.get(pid)
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, known, client)
        schema = str(api.project(pid).get("label_config") or "")
        config = parse_label_config(schema)  # a config usam cannot read fails here, before any job
        if not config.images:
            raise UsamError(
                f"project {pid} has no <Image> with brush, polygon, rectangle or ellipse labels: usam refine "
                "refines those regions"
            )
        store.put(ProjectRecord(pid, schema, known.hostname if known else api.url,
                                known.access_token if known else None,
                                hostname_trusted=known.hostname_trusted if known else False))  # fmt: skip
        listed = list(api.tasks(pid))
    versions = {int(t["id"]): {str(p.get("model_version")) for p in t.get("predictions") or []} for t in listed}
    with_source = sorted(t for t, v in versions.items() if from_version in v)
    todo = [t for t in with_source if target not in versions[t]]
    print(f"project {pid}: {len(with_source)} task(s) have a {from_version} prediction, {len(todo)} lack {target}")
    if not todo:
        return 0 if with_source else 1
    specs = refine_jobs(pid, todo, from_version, chunk=settings.preannotate_chunk, use_global=use_global,
                        trigger="usam refine")  # fmt: skip
    outcome = run_task_jobs(settings, specs, total=len(todo), desc="refining", wait=wait, timeout=timeout)
    if outcome is None:
        return 0
    totals = outcome.totals
    print(f"refined {totals['refined']} under {target}, skipped {totals['skipped']}, failed {totals['failed']}")
    for job in outcome.failed_jobs:
        print(f"job {job['id']} {job['status']}: {job.get('error')}")
    return 1 if outcome.failed_jobs or totals["failed"] else 0
