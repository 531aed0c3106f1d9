"""``usam bench-video``: frames per second of the video paths, and where the time goes.

A synthetic clip (``objects`` shapes moving across a ``size``-wide frame) is encoded to H.264 and
decoded back with PyAV; the head (random weights, real architecture) runs on every ``stride``-th
frame; ByteTrack links the objects' boxes (the true boxes, jittered: a random head finds no real
objects, and the tracker's and SAM's cost depend on how many there are); SAM segments every frame
from its track boxes. Random SAM weights unless a checkpoint is on disk: the timings are real.

Two throughputs are reported, as the product uses them:

- **tracks** (Label Studio ``<Video>``: labelled box tracks): decode + head on the strided frames + tracking;
- **masks** (``usam video``, frame sequences): the above + SAM on every frame (its embedding
  reused on the strided frames).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from usam_backend.core.settings import Settings
from usam_backend.core.video import read_clip, write_video
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import Detections, segment_video, track_boxes
from usam_backend.tools.bench import bench_image, random_head


def moving_clip(frames: int, size: int, objects: int, seed: int = 0) -> tuple[list[np.ndarray], list[Detections]]:
    """Frames (4:3) with ``objects`` discs moving on straight lines, and their jittered true boxes."""
    height, width = size * 3 // 4, size
    rng = np.random.default_rng(seed)
    background = bench_image((height, width), seed)
    starts = rng.uniform(0.15, 0.85, size=(objects, 2)) * (width, height)
    speeds = rng.uniform(-0.4, 0.4, size=(objects, 2)) * (width, height) / max(frames, 1)
    radii = rng.uniform(0.05, 0.1, size=objects) * width
    colors = rng.integers(0, 256, size=(objects, 3))
    out: list[np.ndarray] = []
    detections: list[Detections] = []
    for t in range(frames):
        image = background.copy()
        boxes = []
        for k in range(objects):
            cx, cy = starts[k] + speeds[k] * t
            r = radii[k]
            cv2.circle(image, (int(cx), int(cy)), int(r), tuple(int(c) for c in colors[k]), -1)
            boxes.append(np.array([cx - r, cy - r, cx + r, cy + r]) + rng.normal(0, 1.5, size=4))
        out.append(image)
        detections.append((np.array(boxes), np.full(objects, 0.8), np.zeros(objects, dtype=int)))
    return out, detections


def run_video_bench(settings: Settings, *, frames: int = 24, size: int = 640, stride: int = 5, objects: int = 4) -> str:
    engine = SamEngine.from_settings(settings.replace(embedding_cache_size=stride + 2), allow_random=True)
    segmenter = SemanticSegmenter.from_settings(engine, random_head(engine), settings)
    clip_frames, truth = moving_clip(frames, size, objects)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.mp4"
        started = time.perf_counter()
        write_video(path, clip_frames, 24)
        encode = time.perf_counter() - started
        started = time.perf_counter()
        clip = read_clip(path)
        seconds["decode"] = time.perf_counter() - started
    chosen = list(range(0, len(clip), stride))
    track_boxes([truth[0]])  # imports the tracker: not charged to tracking
    started = time.perf_counter()
    for i in chosen:
        segmenter.segment(clip.frames[i])
    seconds["head"] = time.perf_counter() - started
    started = time.perf_counter()
    tracks = track_boxes([truth[i] for i in chosen], frames=chosen, min_hits=min(3, len(chosen)))
    seconds["tracking"] = time.perf_counter() - started
    started = time.perf_counter()
    segment_video(clip.frames, tracks, EnginePredictor(engine))
    seconds["sam"] = time.perf_counter() - started
    n = len(clip)
    boxes_path = seconds["decode"] + seconds["head"] + seconds["tracking"]
    masks_path = boxes_path + seconds["sam"]
    height, width = clip.frames[0].shape[:2]
    lines = [
        f"usam bench-video: SAM {engine.sam.sam_type} ({engine.sam.weights}), {n} frames of {width}x{height}, "
        f"{objects} moving objects, head on 1 frame in {stride} ({len(chosen)} frames), {settings.points} grid "
        f"points, device {engine.device}, {torch.get_num_threads()} CPU threads",
        f"{'stage':<34}{'seconds':>9}{'per frame':>12}",
        f"{'encode H.264 (writing the clip)':<34}{encode:>9.2f}{encode / n * 1000:>10.1f}ms",
        f"{'decode (PyAV)':<34}{seconds['decode']:>9.2f}{seconds['decode'] / n * 1000:>10.1f}ms",
        f"{'head on strided frames':<34}{seconds['head']:>9.2f}{seconds['head'] / len(chosen):>11.2f}s"
        "  (per strided frame)",
        f"{'tracking (ByteTrack)':<34}{seconds['tracking']:>9.3f}{seconds['tracking'] / n * 1000:>10.2f}ms",
        f"{'SAM from track boxes, every frame':<34}{seconds['sam']:>9.2f}{seconds['sam'] / n:>11.2f}s"
        f"  ({len(tracks)} tracks)",
        f"tracks (Label Studio video):  {n / boxes_path:.2f} frames/s of video",
        f"masks (usam video, sequences): {n / masks_path:.2f} frames/s of video",
        f"SAM image encoder passes: {engine.encoder_calls} for {n} frames (the strided frames' embeddings reused)",
    ]
    return "\n".join(lines)
