"""``usam bench-refine``: what refinement costs per image and per object.

A synthetic scene with ``objects`` filled shapes and a coarse map that overshoots each of them is
refined with usam's engine (random weights unless a checkpoint is on disk: the timings are real):
the local step with the image not yet embedded, the same again with its embedding cached, and local +
global with usam's automatic masks (``usam refine``'s defaults for the device unless given), and
how many times the cached local step that costs.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import torch

from usam_backend.core.settings import Settings
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.generator import AutomaticMasks
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.uosam import RefineReport, generator_options, refine_masks
from usam_backend.tools.bench import bench_image


def coarse_scene(size: tuple[int, int], objects: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image with ``objects`` ellipses of 3 classes, and a coarse map of them grown by 6 %."""
    height, width = size
    rng = np.random.default_rng(seed)
    image = bench_image(size, seed)
    coarse = np.zeros(size, dtype=np.uint8)
    columns = int(np.ceil(np.sqrt(objects)))
    cell_h, cell_w = height // columns, width // columns
    for k in range(objects):
        cy, cx = (k // columns) * cell_h + cell_h // 2, (k % columns) * cell_w + cell_w // 2
        axes = (int(cell_w * rng.uniform(0.2, 0.35)), int(cell_h * rng.uniform(0.2, 0.35)))
        shape = np.zeros(size, dtype=np.uint8)
        cv2.ellipse(shape, (cx, cy), axes, 0, 0, 360, 1, -1)
        image[shape.astype(bool)] = rng.integers(0, 256, size=3)
        grown = cv2.dilate(shape, np.ones((int(cell_w * 0.06) | 1,) * 2, np.uint8)).astype(bool)
        coarse[grown] = 1 + k % 3
    return image, coarse


def run_refine_bench(
    settings: Settings,
    *,
    size: int = 1024,
    objects: int = 8,
    global_points: int | None = None,
    crop_layers: int | None = None,
) -> str:
    engine = SamEngine.from_settings(settings.replace(embedding_cache_size=4), allow_random=True)
    image, coarse = coarse_scene((size * 3 // 4, size), objects)
    started = time.perf_counter()  # sets up the runtimes (an export on CPU) on another image, untimed
    other = engine.embed(np.ascontiguousarray(image[::-1]), use_cache=False)
    engine.predict_prompts(other, boxes=np.array([[0, 0, size // 2, size // 2]], dtype=np.float32), masks=False)
    setup = time.perf_counter() - started
    lines = [
        f"usam bench-refine: SAM {engine.sam.sam_type} ({engine.sam.weights}), {size}x{size * 3 // 4} image, "
        f"{objects} objects, device {engine.device}, {torch.get_num_threads()} CPU threads, "
        f"SAM's encoder in {engine.encoder.name} and its prompt decoder in {engine.prompt_decoder.name} "
        f"(set up and run once on another image in {setup:.1f} s)"
    ]
    cached = 0.0
    for name in ("local, image not embedded yet", "local, embedding cached"):
        report = RefineReport()
        started = time.perf_counter()
        refine_masks(image, coarse, EnginePredictor(engine), report=report)
        cached = time.perf_counter() - started
        per = cached / max(1, len(report.regions))
        lines.append(f"{name:<34}{cached:>8.2f} s  ({len(report.regions)} regions, {per:.3f} s per region, "
                     f"{report.accepted} accepted)")  # fmt: skip
    options = generator_options(engine.device.type, points_per_side=global_points, crop_layers=crop_layers)
    side, layers = options["points_per_side"], options["crop_n_layers"]
    report = RefineReport()
    started = time.perf_counter()
    refine_masks(image, coarse, EnginePredictor(engine), generator=AutomaticMasks(engine, **options), report=report)
    seconds = time.perf_counter() - started
    name = f"local + global ({side}x{side} points, {layers} crop layer{'s' if layers != 1 else ''})"
    lines.append(f"{name:<34}{seconds:>8.2f} s  ({report.global_masks} automatic masks painted; "
                 f"{seconds / max(cached, 1e-9):.1f}x the cached local step)")  # fmt: skip
    return "\n".join(lines)
