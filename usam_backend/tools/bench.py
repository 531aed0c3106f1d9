"""``usam bench``: our inference path against the naive one, stage by stage, on the same image.

Naive path: SAM's own decoder over every grid point in SAM's default batches of 64 (masks
included), every multimask output brought to image size, then the head, threshold and NMS.
Our path: mask tokens only (``sam/decoder.py``), the head, duplicates removed on SAM's 256x256
masks, then masks at image size for the survivors alone.
Both select the same candidates (points, labels, scores, masks), so those must agree; the report
checks that, and then the regions left after NMS. Where those differ, it counts the candidate pairs
whose IoU is over ``USAM_NMS_IOU`` at one resolution and not at the other: the one reason they may.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.head import Head, HeadConfig, HeadNet
from usam_backend.core.masks import pairwise_mask_ious
from usam_backend.core.regions import Regions
from usam_backend.core.settings import Settings
from usam_backend.core.timing import PeakMemory, StageTimer
from usam_backend.sam.cache import ImageEmbedding
from usam_backend.sam.engine import SamEngine
from usam_backend.systems.usam import SemanticSegmenter, finish

NAIVE_BATCH = 64
"""``SamAutomaticMaskGenerator``'s default ``points_per_batch``."""
PIXEL_TOLERANCE = 1e-5
"""Share of mask pixels allowed to differ: the two paths reassociate the same float32 arithmetic,
so a logit within rounding of the 0 threshold may land on the other side."""
STAGES = ("encode", "decode", "head", "masks", "nms")


@dataclass
class PathResult:
    seconds: dict[str, float]
    peak_host_bytes: int
    peak_cuda_bytes: int
    regions: Regions

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class BenchReport:
    sam_type: str
    weights: str
    device: str
    threads: int
    points: int
    size: int
    kept_points: int
    ours: PathResult
    naive: PathResult
    agreement: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.naive.total / self.ours.total

    def to_dict(self) -> dict[str, Any]:
        def path(result: PathResult) -> dict[str, Any]:
            return {
                "seconds": dict(result.seconds),
                "total": result.total,
                "peak_host_mb": result.peak_host_bytes / 2**20,
                "peak_cuda_mb": result.peak_cuda_bytes / 2**20,
                "regions": len(result.regions),
            }

        return {
            "sam_type": self.sam_type,
            "weights": self.weights,
            "random_weights": self.weights.startswith("random"),
            "device": self.device,
            "threads": self.threads,
            "points": self.points,
            "size": self.size,
            "kept_points": self.kept_points,
            "ours": path(self.ours),
            "naive": path(self.naive),
            "ratio_naive_over_ours": self.ratio,
            "agreement": self.agreement,
        }


def bench_image(size: int | tuple[int, int], seed: int = 0) -> np.ndarray:
    """A deterministic RGB scene, ``size`` x ``size`` or (height, width): a gradient with a few
    filled ellipses."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:height, 0:width]
    fx, fy = xx.astype(np.float32) / max(width - 1, 1), yy.astype(np.float32) / max(height - 1, 1)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (80 + 100 * fx + 0 * fy).astype(np.uint8)
    image[..., 1] = (90 + 80 * fy + 0 * fx).astype(np.uint8)
    image[..., 2] = (120 + 60 * (1 - fx) + 0 * fy).astype(np.uint8)
    for _ in range(6):
        cx, cy = rng.uniform(0.15, 0.85, size=2) * (width, height)
        rx, ry = rng.uniform(0.05, 0.18, size=2) * (width, height)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image[inside] = rng.integers(0, 256, size=3)
    return image


def random_head(engine: SamEngine, classes: int = 5, seed: int = 0) -> Head:
    """A head of the real architecture with seeded random weights (the bench needs no training)."""
    config = HeadConfig(input_dim=engine.embedding_dim, num_classes=classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HeadNet(config)
    return Head(net, config, tuple(f"class_{i}" for i in range(classes)), {"sam_type": engine.sam.sam_type})


def run_bench(settings: Settings, *, size: int = 1024, keep_fraction: float = 0.25) -> BenchReport:
    engine = SamEngine.from_settings(settings.replace(embedding_cache_size=0), allow_random=True)
    image = bench_image(size)
    head = random_head(engine)
    segmenter = SemanticSegmenter(engine, head, points=settings.points, nms_iou=settings.nms_iou)
    segmenter.score_threshold, kept = keep_threshold(segmenter, image, keep_fraction)

    sync = engine.device.type == "cuda"
    timer = StageTimer(sync=sync)
    with PeakMemory() as ours_memory:
        ours_regions = segmenter.segment(image, timer=timer)
    ours = PathResult(_ordered(timer.seconds), ours_memory.host_bytes, ours_memory.cuda_bytes, ours_regions)

    timer = StageTimer(sync=sync)
    with PeakMemory() as naive_memory:
        naive_found = naive_candidates(segmenter, image, timer)
        with timer.stage("nms"):
            naive_regions = finish(naive_found, segmenter.nms_iou)
    naive = PathResult(_ordered(timer.seconds), naive_memory.host_bytes, naive_memory.cuda_bytes, naive_regions)
    agreement = compare(ours_regions, naive_regions)
    if not agreement["agree"]:
        agreement.update(nms_crossings(segmenter, image, naive_found))

    return BenchReport(
        sam_type=engine.sam.sam_type,
        weights=engine.sam.weights,
        device=str(engine.device),
        threads=torch.get_num_threads(),
        points=settings.points,
        size=size,
        kept_points=kept,
        ours=ours,
        naive=naive,
        agreement=agreement,
    )


def naive_segment(segmenter: SemanticSegmenter, image: np.ndarray, timer: StageTimer) -> Regions:
    """Decode and upscale masks for every grid point, then classify and remove duplicates (what
    U-SAM's recipe reads as)."""
    found = naive_candidates(segmenter, image, timer)
    with timer.stage("nms"):
        return finish(found, segmenter.nms_iou)


def naive_candidates(segmenter: SemanticSegmenter, image: np.ndarray, timer: StageTimer) -> Regions:
    """The naive path up to NMS: every grid point's masks at image size, the head's choice."""
    engine = segmenter.engine
    with timer.stage("encode"):
        embedding = engine.embed(image, use_cache=False)
    grid = engine.grid_points(embedding.original_size, segmenter.points)
    batches = []
    for start in range(0, len(grid), NAIVE_BATCH):  # as SamAutomaticMaskGenerator batches points
        with timer.stage("decode"):
            tokens, iou, logits = engine.reference_decode(embedding, grid[start : start + NAIVE_BATCH], NAIVE_BATCH)
        with timer.stage("masks"):
            batches.append((tokens, iou, _upscale_all(engine, logits, embedding)))  # b, 3, H, W
    tokens, iou = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    all_masks = np.concatenate([b[2] for b in batches])
    with timer.stage("head"):
        probs = segmenter.head.predict_proba(tokens)
        scores, class_ids = probs.max(dim=1)
        keep = torch.nonzero(scores >= segmenter.score_threshold).squeeze(1)
        sam_scores, best = iou[keep].max(dim=1)
    keep_np, best_np = keep.cpu().numpy(), best.cpu().numpy()
    regions = Regions(
        masks=all_masks[keep_np, best_np],
        class_ids=class_ids[keep].cpu().numpy().astype(np.int64),
        scores=scores[keep].float().cpu().numpy(),
        points=grid[keep_np],
        sam_scores=sam_scores.float().cpu().numpy(),
        class_names=segmenter.class_names,
    )
    return regions.select(np.asarray(regions.masks.reshape(len(regions), -1).any(axis=1)))


def nms_crossings(segmenter: SemanticSegmenter, image: np.ndarray, naive: Regions) -> dict[str, Any]:
    """Why two results differ after NMS: whether both paths chose the same candidates (points,
    labels, scores within 1e-4), and how many candidate pairs overlap by more than the NMS IoU on
    SAM's 256x256 masks (ours) but not on image-size masks (naive), or the other way."""
    embedding = segmenter.engine.embed(image, use_cache=False)
    found = segmenter.candidates(embedding)
    scores = found.scores.float().cpu().numpy()
    low = segmenter.low_res_masks(found.logits, embedding)
    order = np.lexsort((found.points[:, 0], found.points[:, 1]))
    naive_order = np.lexsort((naive.points[:, 0], naive.points[:, 1]))
    same = (
        len(order) == len(naive_order)
        and np.array_equal(found.points[order], naive.points[naive_order])
        and np.array_equal(found.class_ids.cpu().numpy()[order], naive.class_ids[naive_order])
        and float(np.abs(scores[order] - naive.scores[naive_order]).max(initial=0.0)) < 1e-4
    )
    if not same:
        return {"candidates_agree": False}
    threshold = segmenter.nms_iou
    ours_overlap = pairwise_mask_ious(low[order]) > threshold
    crossings = ours_overlap != (pairwise_mask_ious(naive.masks[naive_order]) > threshold)
    return {"candidates_agree": True, "candidates": len(order), "nms_crossings": int(np.triu(crossings, 1).sum())}


def compare(ours: Regions, naive: Regions) -> dict[str, Any]:
    """How far two results are apart: region count, labels, scores, mask pixels.

    ``agree``: the same regions with the same labels, scores within 1e-4, and at most
    ``PIXEL_TOLERANCE`` of the mask pixels different (float rounding).
    """
    same_count = len(ours) == len(naive)
    result: dict[str, Any] = {"regions": [len(ours), len(naive)], "agree": False}
    if not same_count:
        return result
    labels_equal = bool(np.array_equal(ours.class_ids, naive.class_ids))
    score_diff = float(np.abs(ours.scores - naive.scores).max()) if len(ours) else 0.0
    pixels = int(np.count_nonzero(ours.masks != naive.masks))
    result.update(
        labels_equal=labels_equal,
        max_score_difference=score_diff,
        differing_mask_pixels=pixels,
        mask_pixels=int(ours.masks.size),
        agree=labels_equal and score_diff < 1e-4 and pixels <= PIXEL_TOLERANCE * max(ours.masks.size, 1),
    )
    return result


def format_report(report: BenchReport) -> str:
    random_note = (
        "random weights: timings are real, masks and labels are not"
        if report.weights.startswith("random")
        else f"weights: {report.weights}"
    )
    lines = [
        f"usam bench: SAM {report.sam_type} ({random_note})",
        f"{report.points} grid points, {report.size}x{report.size} image, device {report.device}, "
        f"{report.threads} CPU threads, {report.kept_points} points over the score threshold",
        "",
        f"{'stage':<10}{'ours (s)':>12}{'naive (s)':>12}",
    ]
    for stage in STAGES:
        lines.append(
            f"{stage:<10}{report.ours.seconds.get(stage, 0.0):>12.3f}{report.naive.seconds.get(stage, 0.0):>12.3f}"
        )
    lines += [
        f"{'total':<10}{report.ours.total:>12.3f}{report.naive.total:>12.3f}",
        "",
        f"naive / ours: {report.ratio:.2f}x",
        f"peak host memory above start: ours {report.ours.peak_host_bytes / 2**20:.0f} MiB, "
        f"naive {report.naive.peak_host_bytes / 2**20:.0f} MiB",
    ]
    if report.device.startswith("cuda"):
        lines.append(
            f"peak CUDA memory: ours {report.ours.peak_cuda_bytes / 2**20:.0f} MiB, "
            f"naive {report.naive.peak_cuda_bytes / 2**20:.0f} MiB"
        )
    agreement = report.agreement
    if not agreement.get("agree") and agreement.get("nms_crossings"):
        lines.append(
            f"outputs agree up to NMS's resolution: the same {agreement['candidates']} candidates (points, labels, "
            f"scores); after NMS ours kept {agreement['regions'][0]}, naive {agreement['regions'][1]}: "
            f"{agreement['nms_crossings']} candidate pairs overlap by more than USAM_NMS_IOU on SAM's 256x256 masks "
            "(ours) and not on image-size masks (naive), or the other way"
        )
    elif agreement.get("agree"):
        lines.append(
            f"outputs agree: {agreement['regions'][0]} regions, same labels, max score difference "
            f"{agreement['max_score_difference']:.1e}, {agreement['differing_mask_pixels']:,} of "
            f"{agreement['mask_pixels']:,} mask pixels differ (float rounding)"
        )
    else:
        lines.append(f"outputs DIFFER: {json.dumps(agreement)}")
    lines.append(f"({platform.processor() or platform.machine()}, torch {torch.__version__})")
    return "\n".join(lines)


def _upscale_all(engine: SamEngine, logits: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
    d, m = logits.shape[:2]
    full = engine.model.postprocess_masks(logits, embedding.input_size, embedding.original_size)
    return (full > engine.model.mask_threshold).cpu().numpy().reshape(d, m, *embedding.original_size)


def keep_threshold(segmenter: SemanticSegmenter, image: np.ndarray, keep_fraction: float) -> tuple[float, int]:
    """The score threshold that keeps ``keep_fraction`` of the grid (a random head has no other),
    and how many points it keeps. Also warms up the model before anything is timed."""
    engine = segmenter.engine
    embedding = engine.embed(image, use_cache=False)
    grid = engine.grid_points(embedding.original_size, segmenter.points)
    tokens = torch.cat([chunk.decoded.tokens for chunk in engine.decode(embedding, grid)])
    best = segmenter.head.predict_proba(tokens).max(dim=1).values.float().cpu().numpy()
    threshold = float(np.quantile(best, 1.0 - keep_fraction))
    return threshold, int((best >= threshold).sum())


def _ordered(seconds: dict[str, float]) -> dict[str, float]:
    return {stage: seconds.get(stage, 0.0) for stage in STAGES}
