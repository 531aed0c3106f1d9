"""``usam bench-video``: frames per second of the video paths, and where the time goes.

A synthetic clip (``objects`` shapes moving across a ``size``-wide frame) is encoded to H.264 and
decoded back with PyAV; the head (random weights, real architecture) runs on every ``stride``-th
frame; :func:`~usam_backend.systems.uvosam.track_boxes` links the objects' boxes (the true boxes,
jittered: a random head finds no real objects, and the linker's and SAM's cost depend on how many
there are); SAM segments every frame
from its track boxes. Random SAM weights unless a checkpoint is on disk: the timings are real.

Three throughputs are reported, as the product uses them:

- **tracks** (Label Studio ``<Video>``: labelled box tracks): decode + head on the strided frames + tracking;
- **masks** (``usam video --head``): decode + one pass over the clip
  (:func:`~usam_backend.systems.uvosam.video_objects`): SAM's encoder once per frame, the head on
  the strided frames' embeddings, ``objects`` objects followed on every frame (the head's work is
  done and timed, but a random head finds no real objects, so the detections it hands on are the
  jittered true boxes), no embedding cache;
- **--box** (``usam video --box``): ``objects`` objects followed together from one keyframe.

For each, the SAM image encoder's passes per frame and its share of the time (whatever runtime
runs it). With ``memory_frames``, ``usam video`` itself runs on clips of those lengths (160x120, a
tracked object on the first 30 frames) and its peak Python and NumPy allocations are reported:
frames and id maps stream through, so the peak should not grow with the length.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from usam_backend.core.settings import Settings
from usam_backend.core.video import read_clip, write_video
from usam_backend.sam.cache import EmbeddingCache
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import (
    Detections,
    Track,
    follow_objects,
    head_detector,
    sampled_frames,
    track_boxes,
    video_objects,
)
from usam_backend.tools.bench import bench_image, random_head
from usam_backend.tools.video_files import ClipReader, run_video


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


class _Clock:
    """Wraps one of an engine's parts (``encoder`` or ``prompt_decoder``, whatever its runtime) to add
    up the seconds it runs and, for the decoder, the prompts it decodes."""

    def __init__(self, engine: SamEngine, part: str):
        self.seconds, self.prompts = 0.0, 0
        self.runtime = getattr(engine, part)
        setattr(engine, part, self)

    def __call__(self, *inputs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.runtime(*inputs)
        finally:
            self.seconds += time.perf_counter() - started
            if len(inputs) > 1:
                self.prompts += int(inputs[1].shape[0])  # the decoder's sparse prompt embeddings: a row a prompt


def run_video_bench(
    settings: Settings, *, frames: int = 24, size: int = 640, stride: int = 5, objects: int = 4,
    memory_frames: Sequence[int] = (),
) -> str:  # fmt: skip
    engine = SamEngine.from_settings(settings.replace(embedding_cache_size=stride + 2), allow_random=True)
    clock = _Clock(engine, "encoder")
    decoding = _Clock(engine, "prompt_decoder")
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
    chosen = sampled_frames(0, len(clip), stride)
    track_boxes([truth[0]])  # warms up: not charged to tracking
    calls, encoder = engine.encoder_calls, clock.seconds
    started = time.perf_counter()
    for i in chosen:
        segmenter.segment(clip.frames[i])
    seconds["head"] = time.perf_counter() - started
    started = time.perf_counter()
    tracks = track_boxes([truth[i] for i in chosen], frames=chosen, min_hits=min(3, len(chosen)))
    seconds["tracking"] = time.perf_counter() - started
    head_calls, head_encoder = engine.encoder_calls - calls, clock.seconds - encoder
    # Sets up the prompt decoder's runtime (an export on CPU) before it is timed, as the head's
    # frames set up the encoder's.
    engine.predict_prompts(engine.embed(clip.frames[chosen[0]]), boxes=truth[0][0][:1], masks=False)
    engine.cache = EmbeddingCache(0)  # the one pass shares each frame's embedding without a cache
    head = head_detector(segmenter)
    sampled = set(chosen)
    position = {id(frame): t for t, frame in enumerate(clip.frames)}

    head_seconds = [0.0]

    def detector(frame: np.ndarray, embedding: Any) -> Detections | None:
        started = time.perf_counter()
        head(frame, embedding)  # the head's work on the frame's embedding, what a trained head costs
        head_seconds[0] += time.perf_counter() - started
        return truth[position[id(frame)]]  # a random head finds no real objects: the true boxes, jittered

    calls, encoder, decoder, prompts = engine.encoder_calls, clock.seconds, decoding.seconds, decoding.prompts
    started = time.perf_counter()
    predictor = EnginePredictor(engine)
    painted = video_objects(clip.frames, detector, predictor, stride=stride, min_hits=min(3, len(sampled)))
    assert sum(1 for _ in painted) == len(clip)
    seconds["one pass"] = time.perf_counter() - started
    mask_calls, mask_encoder = engine.encoder_calls - calls, clock.seconds - encoder
    mask_decoder, mask_prompts = decoding.seconds - decoder, decoding.prompts - prompts
    n = len(clip)
    boxes_path = seconds["decode"] + seconds["head"] + seconds["tracking"]
    masks_path = seconds["decode"] + seconds["one pass"]
    keyframes = {k: (0, box) for k, box in enumerate(truth[0][0], start=1)}
    calls, encoder = engine.encoder_calls, clock.seconds
    started = time.perf_counter()
    follow_objects(clip.frames, keyframes, EnginePredictor(engine))
    follow = time.perf_counter() - started
    follow_calls, follow_encoder = engine.encoder_calls - calls, clock.seconds - encoder
    height, width = clip.frames[0].shape[:2]
    rest = masks_path - head_seconds[0] - mask_encoder - mask_decoder
    lines = [
        f"usam bench-video: SAM {engine.sam.sam_type} ({engine.sam.weights}), {n} frames of {width}x{height}, "
        f"{objects} moving objects, head on 1 frame in {stride} and the last ({len(chosen)} frames), "
        f"{settings.points} grid points, device {engine.device}, {torch.get_num_threads()} CPU threads, "
        f"SAM's encoder in {clock.runtime.name}, its prompt decoder in {decoding.runtime.name}",
        f"{'stage':<34}{'seconds':>9}{'per frame':>12}",
        f"{'encode H.264 (writing the clip)':<34}{encode:>9.2f}{encode / n * 1000:>10.1f}ms",
        f"{'decode (PyAV)':<34}{seconds['decode']:>9.2f}{seconds['decode'] / n * 1000:>10.1f}ms",
        f"{'head on strided frames':<34}{seconds['head']:>9.2f}{seconds['head'] / len(chosen):>11.2f}s"
        "  (per strided frame)",
        f"{'tracking (linking)':<34}{seconds['tracking']:>9.3f}{seconds['tracking'] / n * 1000:>10.2f}ms",
        f"{'usam video one pass, every frame':<34}{seconds['one pass']:>9.2f}{seconds['one pass'] / n:>11.2f}s"
        f"  (SAM following {objects} objects, the head on {len(sampled)} frames; {len(tracks)} tracks linked)",
        f"tracks (Label Studio video):  {n / boxes_path:.2f} frames/s of video; encoder passes per frame "
        f"{head_calls / n:.2f}, the encoder {_share(head_encoder, boxes_path)} of the time",
        f"masks (usam video --head):    {n / masks_path:.2f} frames/s of video; encoder passes per frame "
        f"{mask_calls / n:.2f}, the encoder {_share(mask_encoder, masks_path)} of the time "
        f"({mask_encoder / n:.2f} s of {masks_path / n:.2f} s a frame, decoding included); without the head's "
        f"{head_seconds[0] / n:.2f} s a frame, the encoder {_share(mask_encoder, masks_path - head_seconds[0])} "
        f"of making the masks, SAM's decoder {_share(mask_decoder, masks_path - head_seconds[0])} "
        f"({mask_prompts / n:.1f} box prompts a frame), the rest {_share(rest, masks_path - head_seconds[0])}",
        f"--box with {objects} objects followed together: {n / follow:.2f} frames/s; encoder passes per frame "
        f"{follow_calls / n:.2f}, the encoder {_share(follow_encoder, follow)} of the time",
    ]
    for count in memory_frames:
        peak, wall = streamed_memory(engine, count, stride)
        lines.append(
            f"usam video --head on {count} frames of 160x120 (an object on the first 30): peak {peak / 2**20:.1f} MiB "
            f"allocated by Python and NumPy (tracemalloc), {wall:.1f} s"
        )
    return "\n".join(lines)


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole > 0 else "-"


def streamed_memory(engine: SamEngine, count: int, stride: int = 5) -> tuple[int, float]:
    """Peak bytes that Python and NumPy allocate while ``usam video --head``'s one pass writes a
    ``count``-frame 160x120 clip's id maps and ``tracks.json``: a disc on the first 30 frames,
    which the head (standing in: its true box) finds on every ``stride``-th frame and SAM follows."""
    frames, truth = moving_clip(min(count, 30), 160, 1)
    background = frames[-1]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.mp4"
        write_video(path, (frames[t] if t < len(frames) else background for t in range(count)), 24)
        position: dict[int, int] = {}  # the frames pulled and not yet segmented (one is read ahead)

        def counted(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
            for index, frame in enumerate(frames):
                for key in [k for k, i in position.items() if i < index - 2]:
                    del position[key]  # segmented
                position[id(frame)] = index
                yield frame

        def detector(frame: np.ndarray, embedding: Any) -> Detections | None:
            index = position[id(frame)]
            return truth[index] if index < len(truth) else None

        def objects(
            frames: Iterator[np.ndarray], indices: Iterator[int], tracks: dict[int, Track]
        ) -> Iterator[np.ndarray]:
            return video_objects(counted(frames), detector, EnginePredictor(engine), stride=stride,
                                 frame_indices=indices, tracks=tracks)  # fmt: skip

        started = time.perf_counter()
        tracemalloc.start()
        try:
            reader = ClipReader.open(path, max_frames=count + 1, max_pixels=10**6)
            run_video(reader, None, EnginePredictor(engine), Path(folder) / "out", source={"bench": count},
                      progress=False, objects=objects)  # fmt: skip
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, time.perf_counter() - started
