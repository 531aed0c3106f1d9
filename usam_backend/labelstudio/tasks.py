"""Label Studio tasks in, Label Studio predictions out: the per-task work the server and the
pre-annotation jobs share.

For each image of a task: fetch it (:mod:`usam_backend.labelstudio.media`), segment it with the
head chosen for the project (:mod:`usam_backend.systems.usam`), and format the regions as brush
results carrying the project's labels; the regions are logged for learning from annotators.

A frame sequence (``<Image valueList>``) is one video (:mod:`usam_backend.labelstudio.sequences`).
A smart-brush stroke on one frame of a sequence is refined there and followed through the other
frames.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from usam_backend.core.errors import UsamError
from usam_backend.core.images import load_image
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Region
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.annotations import SHAPES
from usam_backend.labelstudio.config import LabelConfig
from usam_backend.labelstudio.feedback import FeedbackStore
from usam_backend.labelstudio.interactive import BrushStroke, PromptError, parse_brush_strokes, parse_prompt
from usam_backend.labelstudio.media import TaskImageFetcher
from usam_backend.labelstudio.results import brush_region, mask_results, prediction, region_id, shape_part
from usam_backend.labelstudio.sequences import (
    Basic,
    FrameCache,
    SequenceLimits,
    fetch_frames,
    predict_sequence,
    sequence_refs,
)
from usam_backend.registry import HeadChoice
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.generator import AutomaticMasks
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.prompts import segment_prompt
from usam_backend.systems.uosam import RefineReport, generator_options, refine_masks
from usam_backend.systems.usam import SemanticSegmenter, Survivors
from usam_backend.systems.uvosam import Lock, follow_object

log = logging.getLogger("usam.tasks")

MAX_SEGMENTERS = 4  # heads kept ready on the device at once


class TaskPredictor:
    """Predicts Label Studio tasks with a head; one per process is enough.

    Args:
        engine: returns the SAM engine (loaded lazily, once per process).
        feedback: where predictions are logged for comparison with annotations.
        lock: held around model computation (shared with in-process jobs).
        on_failure: told ``(task id, reason)`` when a task gets an empty prediction.
    """

    def __init__(
        self, settings: Settings, engine: Callable[[], SamEngine], feedback: FeedbackStore, lock: Lock,
        on_failure: Callable[[object, str], None] | None = None,
    ):  # fmt: skip
        self.settings = settings
        self.engine = engine
        self.feedback = feedback
        self.lock = lock
        self.on_failure = on_failure
        self._segmenters: dict[str, SemanticSegmenter] = {}
        self._guard = threading.Lock()
        self.sequences = FrameCache()
        self.limits = SequenceLimits(settings.sequence_max_frames, settings.max_image_pixels)

    def predict(
        self, task: dict[str, Any], config: LabelConfig, choice: HeadChoice, fetcher: TaskImageFetcher,
        basic: Basic = None, pid: str | None = None, deadline: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """A task's prediction (empty, with the reason reported, when its image cannot be used).

        Raises:
            OutOfTime: a frame sequence could not finish before ``deadline`` (``time.monotonic()``).
        """
        task_id = task.get("id")
        results: list[dict[str, Any]] = []
        logged: list[Region] = []
        confidences: list[float] = []
        try:
            for image_name, field_ in config.images.items():
                by_class = config.labels_by_class(image_name, choice.served)
                if not by_class:
                    continue
                if field_.sequence:
                    refs = sequence_refs(task, field_.key, self.limits)  # not cached: only smart-brush sessions are
                    frames = fetch_frames(task, refs, fetcher, basic, self.limits)
                    results += predict_sequence(
                        frames, self.segmenter(choice), by_class, choice, task_id=task_id, image_name=image_name,
                        stride=self.settings.video_stride, lock=self.lock, deadline=deadline, logged=logged,
                    )  # fmt: skip
                    continue
                image = self.task_image(task, field_.key, fetcher, basic)
                head_classes = {choice.head.class_names[i] for i in by_class}
                with self.lock:
                    segmenter = self.segmenter(choice)
                    survivors = segmenter.survivors(segmenter.engine.embed(image), classes=head_classes)
                    confidences.append(survivors.confidence)
                    for found, (i, mask) in enumerate(self._masks(image, survivors)):  # one image-sized mask at a time
                        score, rle = float(survivors.scores[i]), mask_to_rle(mask)
                        for label in by_class[int(survivors.class_ids[i])]:
                            rid = region_id(choice.version, task_id, image_name, found, *shape_part(label))
                            results += mask_results(mask, label, score, rid)
                            logged.append(Region(rid, label.value, label.control, label.image, rle, score,
                                                 shape=SHAPES[label.kind]))  # fmt: skip
                del image
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

    def _masks(self, image: np.ndarray, survivors: Survivors) -> Iterator[tuple[int, np.ndarray]]:
        """(survivor index, non-empty (H, W) bool mask), refined as ``USAM_REFINE`` says."""
        mode = self.settings.refine
        if mode == "off":
            for i in range(len(survivors)):
                mask = survivors.mask(i)
                if mask.any():
                    yield i, mask
            return
        regions = np.zeros(image.shape[:2], dtype=np.int32)  # survivor index + 1, the best painted last
        for i in np.argsort(survivors.scores, kind="stable"):
            regions[survivors.mask(int(i))] = int(i) + 1
        engine = survivors.segmenter.engine
        generator = AutomaticMasks(engine, **generator_options(engine.device.type)) if mode != "local" else None
        refined = refine_masks(
            image, regions, EnginePredictor(survivors.segmenter.engine), generator=generator, local=mode != "global",
            ignore=None, min_region_area=max(100, regions.size // 1000), max_regions=2 * len(survivors),
        )  # fmt: skip
        for i in range(len(survivors)):
            mask = refined == i + 1
            if mask.any():
                yield i, mask

    def interactive(
        self, task: dict[str, Any], context: list[Any], config: LabelConfig, fetcher: TaskImageFetcher,
        basic: Basic, version: str,
    ) -> dict[str, Any]:  # fmt: skip
        """One brush mask for a smart-tool prompt, with the prompt's label; for smart-brush
        strokes, the strokes refined by SAM (:func:`~usam_backend.systems.uosam.refine_masks`)."""
        strokes = parse_brush_strokes(context, config)
        if strokes:
            return self.refine_strokes(task, strokes, config, fetcher, basic, version)
        prompt = parse_prompt(context, config)
        image = self.task_image(task, config.images[prompt.image].key, fetcher, basic)
        points, point_labels, box = prompt.pixels(*image.shape[:2])
        engine = self.engine()
        with self.lock:
            found = segment_prompt(engine, image, points=points, point_labels=point_labels, box=box)
        rid = region_id(version, task.get("id"), "prompt")
        return prediction(mask_results(found.mask, prompt.label, found.score, rid), version)

    def refine_strokes(
        self, task: dict[str, Any], strokes: list[BrushStroke], config: LabelConfig, fetcher: TaskImageFetcher,
        basic: Basic, version: str,
    ) -> dict[str, Any]:  # fmt: skip
        """Rough brush regions refined to SAM's boundaries, each answered under its own id (accepting
        the suggestion replaces the rough region); a region SAM does not agree with comes back as
        drawn. A region's score is the mean IoU of its accepted parts with SAM's masks (0: none)."""
        results = []
        images: dict[tuple[str, int | None], np.ndarray] = {}
        sequences: dict[str, list[np.ndarray]] = {}
        for stroke in strokes:
            field_ = config.images[stroke.image]
            where = (stroke.image, stroke.item_index)
            if where not in images:
                if field_.sequence:
                    sequences[stroke.image] = self.sequences.get(task, field_.key, fetcher, basic, self.limits)
                    count = len(sequences[stroke.image])
                    if not (stroke.item_index or 0) < count:
                        raise PromptError(f"a stroke is on frame {stroke.item_index} of a {count}-frame sequence")
                    images[where] = sequences[stroke.image][stroke.item_index or 0]
                else:
                    images[where] = self.task_image(task, field_.key, fetcher, basic)
            image = images[where]
            drawn = stroke.mask_on(*image.shape[:2])  # its size checked before its RLE is decoded
            report = RefineReport()
            with self.lock:
                refined = refine_masks(image, drawn.astype(np.uint8), EnginePredictor(self.engine()),
                                       report=report, min_region_area=16)  # fmt: skip
            accepted = [r["iou"] for r in report.regions if r["accepted"]]
            score = float(np.mean(accepted)) if accepted else 0.0
            if (refined == 1).any():
                results.append(brush_region(refined == 1, stroke.label, score, stroke.id, stroke.item_index))
                if stroke.image in sequences and _first_of_its_label(stroke, strokes):
                    results += self._follow(task, stroke, refined == 1, sequences[stroke.image], score, version)
        return prediction(results, version)

    def _follow(
        self, task: dict[str, Any], stroke: BrushStroke, mask: np.ndarray, frames: list[np.ndarray], score: float,
        version: str,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The stroke's object followed through the other frames of its sequence."""
        found = follow_object(frames, stroke.item_index or 0, EnginePredictor(self.engine()), mask=mask, lock=self.lock)
        return [
            brush_region(m, stroke.label, score, region_id(version, task.get("id"), stroke.id, index), index)
            for index, m in found.items()
            if index != stroke.item_index
        ]

    def segmenter(self, choice: HeadChoice) -> SemanticSegmenter:
        """The segmenter for a head, kept for the :data:`MAX_SEGMENTERS` heads used last."""
        with self._guard:
            segmenter = self._segmenters.get(choice.version)
            if segmenter is None:
                segmenter = SemanticSegmenter.from_settings(self.engine(), choice.head, self.settings)
            recent = [(v, seg) for v, seg in self._segmenters.items() if v != choice.version][: MAX_SEGMENTERS - 1]
            self._segmenters = {choice.version: segmenter, **dict(recent)}
            return segmenter

    def task_image(self, task: dict[str, Any], key: str, fetcher: TaskImageFetcher, basic: Basic) -> np.ndarray:
        """The task's image in data field ``key``, as HxWx3 uint8 RGB."""
        data = task.get("data")
        if not isinstance(data, dict) or key not in data:
            raise UsamError(f"task {task.get('id')} has no '{key}' field in its data")
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        raw = fetcher.fetch(data[key], task_id, basic)
        return load_image(raw, max_pixels=self.settings.max_image_pixels)

    def _failed(self, task_id: object, reason: str) -> None:
        log.warning("task %s: no prediction: %s", task_id, reason)
        if self.on_failure is not None:
            self.on_failure(task_id, reason)


def _first_of_its_label(stroke: BrushStroke, strokes: list[BrushStroke]) -> bool:
    """Only a label's strokes all on one frame are followed through the sequence: once the label
    has regions on several frames (the annotator accepted a propagation, or drew on another frame)
    each is refined where it is."""
    frames = {s.item_index for s in strokes if s.image == stroke.image and s.label == stroke.label}
    return len(frames) == 1
