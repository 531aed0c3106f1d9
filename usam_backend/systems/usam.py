"""Semantic inference: image + head -> labelled masks.

1. one image-encoder pass (or the cached embedding);
2. a grid of point prompts decoded to mask-token embeddings, chunk by chunk;
3. the head's class probabilities per point; points under the score threshold are dropped;
4. for the kept points only, SAM's three masks, of which the one with the best predicted IoU;
5. mask NMS on those masks at SAM's low resolution (256x256), then only the survivors are brought
   to image size (empty ones dropped): work and memory do not grow with the number of points kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from training.head import Head
from usam_backend.core.masks import low_res_nms, mask_nms
from usam_backend.core.regions import Regions, decision_confidence
from usam_backend.core.settings import Settings
from usam_backend.core.timing import StageTimer
from usam_backend.sam.cache import ImageEmbedding
from usam_backend.sam.engine import SamEngine


@dataclass
class Candidates:
    """Grid points that passed the score threshold, with their chosen low-res mask logits."""

    class_ids: torch.Tensor  # k
    scores: torch.Tensor  # k
    points: np.ndarray  # k, 2
    sam_scores: torch.Tensor  # k
    logits: torch.Tensor  # k, 256, 256
    confidence: float = float("nan")  # of the whole grid, regions.decision_confidence


@dataclass
class Survivors:
    """Regions after mask NMS, their masks still at SAM's low resolution."""

    segmenter: SemanticSegmenter
    embedding: ImageEmbedding
    candidates: Candidates

    def __len__(self) -> int:
        return len(self.candidates.scores)

    @property
    def class_ids(self) -> np.ndarray:
        return self.candidates.class_ids.cpu().numpy().astype(np.int64)

    @property
    def scores(self) -> np.ndarray:
        return self.candidates.scores.float().cpu().numpy()

    @property
    def confidence(self) -> float:
        return self.candidates.confidence

    def mask(self, i: int) -> np.ndarray:
        """Region ``i``'s (H, W) bool mask at the image's size (may be empty)."""
        return self.segmenter.engine.upscale(self.candidates.logits[i : i + 1], self.embedding)[0]

    def regions(self, masks: np.ndarray) -> Regions:
        """The :class:`Regions` of these survivors with their full ``masks`` (n, H, W)."""
        c = self.candidates
        return Regions(
            masks=masks,
            class_ids=self.class_ids,
            scores=self.scores,
            points=c.points,
            sam_scores=c.sam_scores.float().cpu().numpy(),
            class_names=self.segmenter.class_names,
            confidence=c.confidence,
        )


class SemanticSegmenter:
    """Runs a head over SAM's grid-point embeddings of an image."""

    def __init__(
        self, engine: SamEngine, head: Head, *, points: int = 100, score_threshold: float = 0.5, nms_iou: float = 0.5
    ):
        head.check_compatible(engine.sam.sam_type, engine.embedding_dim)
        self.engine = engine
        self.head = head.to(engine.device)
        self.points = points
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou

    @classmethod
    def from_settings(cls, engine: SamEngine, head: Head, settings: Settings) -> SemanticSegmenter:
        """A segmenter with ``USAM_POINTS``, ``USAM_SCORE_THRESHOLD`` and ``USAM_NMS_IOU``."""
        return cls(engine, head, points=settings.points, score_threshold=settings.score_threshold,
                   nms_iou=settings.nms_iou)  # fmt: skip

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.head.class_names

    def segment(
        self, image: np.ndarray, *, classes: set[str] | None = None, timer: StageTimer | None = None
    ) -> Regions:
        """Labelled regions of an HxWx3 uint8 RGB image.

        Args:
            classes: only emit these class names (default: all the head knows).
            timer: collects seconds per stage (encode, decode, head, masks, nms).
        """
        timer = timer or StageTimer()
        with timer.stage("encode"):
            embedding = self.engine.embed(image)
        return self.segment_embedding(embedding, classes=classes, timer=timer)

    def segment_embedding(
        self, embedding: ImageEmbedding, *, classes: set[str] | None = None, timer: StageTimer | None = None
    ) -> Regions:
        timer = timer or StageTimer()
        survivors = self.survivors(embedding, classes=classes, timer=timer)
        if len(survivors) == 0:
            return Regions.empty(embedding.original_size, self.class_names, survivors.confidence)
        with timer.stage("masks"):
            masks = self.engine.upscale(survivors.candidates.logits, embedding)
        regions = survivors.regions(masks)
        return regions.select(np.asarray(masks.reshape(len(masks), -1).any(axis=1)))

    def survivors(
        self, embedding: ImageEmbedding, *, classes: set[str] | None = None, timer: StageTimer | None = None
    ) -> Survivors:
        """Steps 1-5 without bringing masks to image size: the regions that survive mask NMS at
        SAM's low resolution. Their full masks come one at a time (:meth:`Survivors.mask`), so a
        caller that encodes each mask (Label Studio's RLE) holds one image-sized mask at a time."""
        timer = timer or StageTimer()
        candidates = self.candidates(embedding, classes=classes, timer=timer)
        scores = candidates.scores.float().cpu().numpy()
        with timer.stage("nms"):
            kept = low_res_nms(self.low_res_masks(candidates.logits, embedding), scores, self.nms_iou)
        index = torch.as_tensor(kept, device=candidates.logits.device, dtype=torch.long)
        chosen = Candidates(
            class_ids=candidates.class_ids[index],
            scores=candidates.scores[index],
            points=candidates.points[kept],
            sam_scores=candidates.sam_scores[index],
            logits=candidates.logits[index],
            confidence=candidates.confidence,
        )
        return Survivors(self, embedding, chosen)

    def low_res_masks(self, logits: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """(k, h, w) bool masks of the low-res logits, cropped to the image (not SAM's padding)."""
        side = logits.shape[-1]
        encoder_side = self.engine.model.image_encoder.img_size
        height = math.ceil(embedding.input_size[0] * side / encoder_side)
        width = math.ceil(embedding.input_size[1] * side / encoder_side)
        return (logits[:, :height, :width] > self.engine.model.mask_threshold).cpu().numpy()

    @torch.inference_mode()
    def candidates(
        self, embedding: ImageEmbedding, *, classes: set[str] | None = None, timer: StageTimer | None = None
    ) -> Candidates:
        """Steps 2-4: the kept grid points and their chosen low-res mask logits (maybe none), and
        the grid's :func:`~usam_backend.core.regions.decision_confidence`."""
        timer = timer or StageTimer()
        allowed = self._allowed(classes)
        grid = self.engine.grid_points(embedding.original_size, self.points)
        kept: list[Candidates] = []
        best_probs: list[torch.Tensor] = []
        chunks = self.engine.decode(embedding, grid)
        while True:
            with timer.stage("decode"):
                chunk = next(chunks, None)
            if chunk is None:
                break
            with timer.stage("head"):
                probs = self.head.predict_proba(chunk.decoded.tokens) * allowed
                scores, class_ids = probs.max(dim=1)
                best_probs.append(scores.float().cpu())
                index = torch.nonzero(scores >= self.score_threshold).squeeze(1)
            if len(index) == 0:
                continue
            with timer.stage("masks"):
                multimask = self.engine.low_res_logits(chunk, index)  # k, 3, 256, 256
                sam_scores, best = chunk.decoded.iou_predictions[index].max(dim=1)
            kept.append(
                Candidates(
                    class_ids=class_ids[index],
                    scores=scores[index],
                    points=chunk.points[index.cpu().numpy()],
                    sam_scores=sam_scores,
                    logits=multimask[torch.arange(len(index), device=multimask.device), best],
                )
            )
        confidence = (
            decision_confidence(torch.cat(best_probs).numpy(), self.score_threshold) if best_probs else math.nan
        )
        if not kept:
            device = self.engine.device
            return Candidates(
                class_ids=torch.zeros(0, dtype=torch.long, device=device),
                scores=torch.zeros(0, device=device),
                points=np.zeros((0, 2), np.float32),
                sam_scores=torch.zeros(0, device=device),
                logits=torch.zeros(0, 256, 256, device=device),
                confidence=confidence,
            )
        return Candidates(
            class_ids=torch.cat([c.class_ids for c in kept]),
            scores=torch.cat([c.scores for c in kept]),
            points=np.concatenate([c.points for c in kept]),
            sam_scores=torch.cat([c.sam_scores for c in kept]),
            logits=torch.cat([c.logits for c in kept]),
            confidence=confidence,
        )

    def _allowed(self, classes: set[str] | None) -> torch.Tensor:
        names = self.class_names
        flags = [classes is None or name in classes for name in names]
        return torch.tensor(flags, dtype=torch.float32, device=self.engine.device)


def finish(regions: Regions, nms_iou: float) -> Regions:
    """Step 5 on masks already at image size: drop empty masks, then mask NMS (best first)."""
    nonempty = regions.select(np.asarray(regions.masks.reshape(len(regions), -1).any(axis=1)))
    return nonempty.select(mask_nms(nonempty.masks, nonempty.scores, nms_iou))
