"""Semantic inference: image + head -> labelled masks.

1. one image-encoder pass (or the cached embedding);
2. a grid of point prompts decoded to mask-token embeddings, chunk by chunk;
3. the head's class probabilities per point; points under the score threshold are dropped;
4. for the kept points only, SAM's three masks, of which the one with the best predicted IoU;
5. those masks at image size, empty ones dropped, then mask NMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from training.head import Head
from usam_backend.core.masks import mask_nms
from usam_backend.core.regions import Regions, decision_confidence
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
        candidates = self.candidates(embedding, classes=classes, timer=timer)
        if len(candidates.scores) == 0:
            return Regions.empty(embedding.original_size, self.class_names, candidates.confidence)
        with timer.stage("masks"):
            masks = self.engine.upscale(candidates.logits, embedding)
        regions = Regions(
            masks=masks,
            class_ids=candidates.class_ids.cpu().numpy().astype(np.int64),
            scores=candidates.scores.float().cpu().numpy(),
            points=candidates.points,
            sam_scores=candidates.sam_scores.float().cpu().numpy(),
            class_names=self.class_names,
            confidence=candidates.confidence,
        )
        with timer.stage("nms"):
            return finish(regions, self.nms_iou)

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
