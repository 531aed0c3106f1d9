"""usam's automatic mask generator: segment_anything's candidates on the same points (tiny SAM), and
its defaults for the refinement's global step, chosen with the refinement ORACLE."""

from __future__ import annotations

import numpy as np
import pytest
from refine_oracle import CORRUPTIONS, FIGURES, GeometricOracle, OracleGenerator, PointOracle, corrupt, scene
from segment_anything import SamAutomaticMaskGenerator

from usam_backend import refine_masks
from usam_backend.sam.generator import AutomaticMasks
from usam_backend.systems import uosam
from usam_backend.systems.uosam import GENERATOR_OPTIONS, generator_options
from usam_backend.tools.evaluate import miou


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b)))


def _matches(found: list[dict], wanted: list[dict]) -> list[float]:
    """For each wanted record, the best IoU of a found one."""
    return [max((_iou(w["segmentation"], f["segmentation"]) for f in found), default=0.0) for w in wanted]


@pytest.mark.parametrize(
    "options",
    [
        # every candidate kept: each one's mask, score and box through the low-res path
        {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0,
         "crop_n_layers": 1, "crop_nms_thresh": 1.0, "crop_n_points_downscale_factor": 2},
        # the paper's post-processing: box NMS within and between crops, small regions and holes
        {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "crop_n_layers": 1,
         "crop_n_points_downscale_factor": 2, "min_mask_region_area": 100},
    ],
)  # fmt: skip
def test_the_candidates_are_segment_anythings_on_the_same_points(tiny_engine, two_object_image, options):
    stock = SamAutomaticMaskGenerator(tiny_engine.model, **options).generate(two_object_image)
    ours = AutomaticMasks(tiny_engine, **options).generate(two_object_image)
    assert len(ours) == len(stock) > 0
    assert min(_matches(ours, stock)) >= 0.99 and min(_matches(stock, ours)) >= 0.99
    assert sorted(r["predicted_iou"] for r in ours) == pytest.approx(
        sorted(r["predicted_iou"] for r in stock), abs=1e-4
    )
    for record in ours:
        mask = record["segmentation"]
        assert mask.shape == two_object_image.shape[:2] and record["area"] == np.count_nonzero(mask)


def test_driven_by_the_oracle_it_finds_every_shape_of_the_oracle_generator():
    """16 x 16 points on the oracle's scenes: each object, each of its halves and the backdrop, once
    (duplicates of many points removed); the grown masks fail the IoU threshold."""
    for seed in range(2):
        image, instances, _ = scene(seed)
        oracle = PointOracle(instances)
        found = AutomaticMasks(oracle, **{**GENERATOR_OPTIONS, "points_per_side": 16, "crop_n_layers": 0}).generate(
            image
        )
        wanted = OracleGenerator(instances).generate(image)
        assert oracle.calls == 16 * 16 and len(found) == len(wanted) == 16
        assert min(_matches(found, wanted)) > 0.97 and min(_matches(wanted, found)) > 0.97


@pytest.mark.slow
def test_cpu_defaults_score_what_the_papers_setting_scores_on_the_oracle():
    """The CPU defaults (fewest points, no crops) reach the oracle generator's figures, which holds
    every shape the paper's 64 x 64 points with a crop layer find: the same mIoU, at least the local
    step's (the figures of ``test_refine.py``, asserted there)."""
    options = generator_options("cpu")
    assert (options["points_per_side"], options["crop_n_layers"]) == (uosam.CPU_GLOBAL_POINTS, uosam.CPU_CROP_LAYERS)
    for how in CORRUPTIONS:
        scores = []
        for seed in range(4):
            image, instances, semantic = scene(seed)
            coarse = corrupt(semantic, how, seed)
            refined = refine_masks(image, coarse, GeometricOracle(instances),
                                   generator=AutomaticMasks(PointOracle(instances), **options))  # fmt: skip
            scores.append(miou(refined, semantic))
        _coarse, local, every = FIGURES[how]
        assert round(float(np.mean(scores)), 3) == every >= local, (how, scores)


def test_the_options_by_device_and_their_overrides(capsys):
    from usam_backend.cli import main

    assert generator_options("cuda") == GENERATOR_OPTIONS and GENERATOR_OPTIONS["points_per_side"] == 64
    assert generator_options("cpu", points_per_side=8, crop_layers=1) == {
        **GENERATOR_OPTIONS, "points_per_side": 8, "crop_n_layers": 1
    }  # fmt: skip
    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"default: {uosam.CPU_GLOBAL_POINTS} on CPU, the paper's 64 on CUDA" in help_text
    assert f"default: {uosam.CPU_CROP_LAYERS} on CPU, the paper's 1 on CUDA" in help_text
    with pytest.raises(ValueError, match="unknown automatic-mask options"):
        AutomaticMasks(PointOracle(np.zeros((8, 8), np.int32)), points_per_sides=4)
