"""UO-SAM refinement. Random weights cannot show that refinement helps, so its quality is measured
with the deterministic geometric ORACLE of ``refine_oracle`` over synthetic scenes: a measuring
instrument with SamPredictor's interface that answers a wrong prompt worse than the right one, and
a mask generator that answers with the true shapes plus over-segmented pieces. The prompts the
algorithm sends are checked too. The tiny random SAM covers the plumbing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from refine_oracle import (
    CORRUPTIONS,
    FIGURES,
    SIZE,
    GeometricOracle,
    OracleGenerator,
    WrongOracle,
    corrupt,
    from_low_res,
    scene,
)
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from usam_backend import EnginePredictor, refine_masks
from usam_backend.systems.uosam import RefineReport
from usam_backend.tools.evaluate import miou


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_refinement_raises_the_miou_of_corrupted_maps(how):
    gains = []
    for seed in range(4):
        image, instances, semantic = scene(seed)
        coarse = corrupt(semantic, how, seed)
        local = refine_masks(image, coarse, GeometricOracle(instances))
        both = refine_masks(image, coarse, GeometricOracle(instances), generator=OracleGenerator(instances))
        before, after_local, after_both = miou(coarse, semantic), miou(local, semantic), miou(both, semantic)
        gains.append((before, after_local, after_both))
        assert after_local > before + 0.05 and after_both > before + 0.05, (seed, gains[-1])
    mean = np.mean(gains, axis=0)
    print(f"\n{how}: mIoU coarse {mean[0]:.3f} -> local {mean[1]:.3f} -> local+global {mean[2]:.3f} (4 scenes)")
    assert tuple(np.round(mean, 3)) == FIGURES[how]


@pytest.mark.parametrize("how", ["dilated", "noisy edges"])
def test_the_cascade_pass_cleans_the_first_pass(how):
    """The first pass bleeds over the edges; the second, given its best mask, answers it cleanly."""
    for seed in range(4):
        image, instances, semantic = scene(seed)
        coarse = corrupt(semantic, how, seed)
        cascade = miou(refine_masks(image, coarse, GeometricOracle(instances)), semantic)
        single = miou(refine_masks(image, coarse, GeometricOracle(instances), cascade=False), semantic)
        assert cascade > single + 0.05 and cascade > 0.99, (seed, cascade, single)


@pytest.mark.parametrize("how", ["eroded", "shifted"])
def test_the_global_step_restores_what_a_shrunken_or_shifted_box_cut_off(how):
    """The local step gets only the part of an object inside the coarse region's box; the automatic
    masks are whole objects."""
    for seed in range(4):
        image, instances, semantic = scene(seed)
        coarse = corrupt(semantic, how, seed)
        local = miou(refine_masks(image, coarse, GeometricOracle(instances)), semantic)
        both = refine_masks(image, coarse, GeometricOracle(instances), generator=OracleGenerator(instances))
        assert miou(both, semantic) > local + 0.1, (seed, local, miou(both, semantic))


def test_the_global_step_alone_snaps_a_dilated_map_to_the_automatic_masks():
    for seed in range(4):
        image, instances, semantic = scene(seed)
        coarse = corrupt(semantic, "dilated", seed)
        report = RefineReport()
        refined = refine_masks(image, coarse, GeometricOracle(instances), generator=OracleGenerator(instances),
                               local=False, report=report)  # fmt: skip
        assert np.array_equal(refined, semantic) and not report.regions and report.global_masks == 16


def _regions_largest_first(coarse: np.ndarray, min_area: int = 100) -> list[tuple[int, np.ndarray]]:
    """(class, (H, W) bool) of every 8-connected region of a class, the largest first."""
    found = []
    for cls in np.unique(coarse)[1:]:
        count, labels = cv2.connectedComponents((coarse == cls).astype(np.uint8), connectivity=8)
        found += [(int(cls), labels == k) for k in range(1, count) if np.count_nonzero(labels == k) >= min_area]
    return sorted(found, key=lambda found: -np.count_nonzero(found[1]))


def _box(mask: np.ndarray) -> list[int]:
    """XYXY, max exclusive."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_the_prompts_are_each_regions_own_and_the_cascade_takes_the_best_first_pass():
    """Per region, largest first: a positive point at its most interior pixel, a negative point
    outside it within its box grown by a quarter, its own box (not its class's); then the same
    points with the best-scored first-pass mask's box and low-res logits."""
    image, instances, semantic = scene(0)
    coarse = corrupt(semantic, "dilated", 0)
    oracle = GeometricOracle(instances, record=True)
    refine_masks(image, coarse, oracle)
    regions = _regions_largest_first(coarse)
    assert len(regions) == 5 and len(oracle.calls) == 2 * len(regions)
    assert len({cls for cls, _ in regions}) < len(regions)  # a class of two regions: each has its own box
    for (cls, region), first, second in zip(regions, oracle.calls[::2], oracle.calls[1::2], strict=True):
        points, labels = first["point_coords"], first["point_labels"]
        assert points.shape == (2, 2) and points.dtype == np.float32 and labels.tolist() == [1, 0]
        (px, py), (nx, ny) = points.astype(int)
        depth = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        assert region[py, px] and depth[py, px] == depth.max(), (cls, (px, py))
        x0, y0, x1, y1 = _box(region)
        mx, my = (x1 - x0) // 4 + 1, (y1 - y0) // 4 + 1
        assert not region[ny, nx] and x0 - mx <= nx < x1 + mx and y0 - my <= ny < y1 + my, (cls, (nx, ny))
        assert first["box"].tolist() == [x0, y0, x1, y1] and first["multimask_output"] and first["mask_input"] is None
        best = int(np.argmax(first["scores"]))
        assert np.array_equal(second["point_coords"], points) and np.array_equal(second["point_labels"], labels)
        assert second["box"].tolist() == _box(first["masks"][best]) and not second["multimask_output"]
        assert np.array_equal(second["mask_input"], first["low_res"][best][None])


# A literal scene for the oracle's own check: two rectangles on a backdrop, in an image wider than high.
OBJECTS = np.zeros((64, 96), dtype=np.int32)
OBJECTS[10:30, 40:70] = 1
OBJECTS[40:60, 5:25] = 2
RIGHT = {"point_coords": np.array([[55.0, 20.0], [85.0, 50.0]], dtype=np.float32), "point_labels": np.array([1, 0]),
         "box": np.array([36.0, 6.0, 74.0, 34.0])}  # fmt: skip


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b))


@pytest.mark.parametrize(
    ("prompt", "low", "high"),
    [
        (RIGHT, 0.6, 0.7),  # the object, bled by 3 px within the box
        ({**RIGHT, "point_labels": np.array([0, 1])}, 0.1, 0.3),  # the object removed: the backdrop in the box
        ({**RIGHT, "point_coords": RIGHT["point_coords"][:, ::-1]}, 0.0, 0.0),  # (y, x): the other object, boxed out
        ({"point_coords": RIGHT["point_coords"][:1], "point_labels": np.array([1])}, 0.3, 0.5),  # ambiguous: grown
        ({**RIGHT, "box": np.array([36.0, 6.0, 55.0, 34.0])}, 0.3, 0.45),  # a shrunken box: the part inside it
    ],
    ids=["right", "labels swapped", "x and y swapped", "lone point", "shrunken box"],
)
def test_the_oracle_answers_a_wrong_prompt_worse_than_the_right_one(prompt, low, high):
    oracle = GeometricOracle(OBJECTS)
    oracle.set_image(np.zeros((*OBJECTS.shape, 3), dtype=np.uint8))
    masks, scores, low_res = oracle.predict(**prompt)
    assert masks.shape == (3, *OBJECTS.shape) and masks.dtype == bool and scores.shape == (3,)
    assert low_res.shape == (3, 256, 256) and low_res.dtype == np.float32
    assert low <= _iou(masks[int(np.argmax(scores))], OBJECTS == 1) <= high


def test_the_oracle_ranks_its_three_masks_and_its_second_pass_needs_the_first():
    oracle = GeometricOracle(OBJECTS)
    oracle.set_image(np.zeros((*OBJECTS.shape, 3), dtype=np.uint8))
    point_and_box = {**RIGHT, "point_coords": RIGHT["point_coords"][:1], "point_labels": np.array([1])}
    masks, scores, low_res = oracle.predict(**point_and_box)  # [part, object, object grown into the box]
    ious = [_iou(mask, OBJECTS == 1) for mask in masks]
    assert np.argsort(scores).tolist() == np.argsort(ious).tolist() and len(set(ious)) == 3
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    assert np.array_equal(from_low_res(low_res[best], OBJECTS.shape), masks[best])
    cascade = {"multimask_output": False, **point_and_box}
    assert _iou(oracle.predict(**cascade, mask_input=low_res[[best]])[0][0], OBJECTS == 1) == 1.0
    assert _iou(oracle.predict(**cascade)[0][0], OBJECTS == 1) == ious[best]  # no mask_input: as coarse
    assert _iou(oracle.predict(**cascade, mask_input=low_res[[worst]])[0][0], OBJECTS == 1) <= 0.5
    with pytest.raises(AssertionError):
        oracle.predict(**RIGHT, mask_input=low_res[best])  # SamPredictor takes (1, 256, 256)


def test_wrong_masks_are_rejected_and_the_coarse_regions_stay():
    image, instances, semantic = scene(5)
    coarse = corrupt(semantic, "dilated", 5)
    report = RefineReport()
    refined = refine_masks(image, coarse, WrongOracle(instances), report=report)
    assert report.regions and report.accepted == 0
    assert np.array_equal(refined, coarse) and miou(refined, semantic) == miou(coarse, semantic)


def test_a_perfect_map_stays_perfect():
    image, instances, semantic = scene(6)
    refined = refine_masks(image, semantic, GeometricOracle(instances), generator=OracleGenerator(instances))
    assert np.array_equal(refined, semantic)


def test_ignored_pixels_small_regions_and_dtype_are_kept():
    image, instances, semantic = scene(7)
    coarse = corrupt(semantic, "dilated", 7).astype(np.uint16)
    coarse[:10, :10] = 255  # void
    coarse[150:153, 150:153] = 2  # a 9-pixel speck: under min_region_area, left alone
    oracle = GeometricOracle(instances)
    refined = refine_masks(image, coarse, oracle, min_region_area=20)
    assert refined.dtype == np.uint16 and oracle.images == 1  # one set_image for the whole map
    assert (refined[:10, :10] == 255).all() and (refined[150:153, 150:153] == 2).all()


def test_a_collapsing_global_step_falls_back_to_the_local_map():
    image, instances, semantic = scene(8)

    class Everything:
        def generate(self, image):
            return [{"segmentation": np.ones(semantic.shape, dtype=bool), "area": semantic.size}]

    report = RefineReport()
    refined = refine_masks(image, semantic, GeometricOracle(instances), generator=Everything(), report=report)
    assert report.global_collapsed and np.array_equal(refined, semantic)


def test_bad_inputs_say_what_is_wrong():
    image, instances, semantic = scene(0)
    with pytest.raises(ValueError, match="must match"):
        refine_masks(image, semantic[:-1], GeometricOracle(instances))
    with pytest.raises(ValueError, match="integer class ids"):
        refine_masks(image, semantic.astype(np.float32), GeometricOracle(instances))


@pytest.mark.parametrize("kind", ["SamPredictor", "EnginePredictor"])
def test_plumbing_with_the_tiny_sam(tiny_engine, kind):
    """Random weights: only shapes, types and the contract are checked here."""
    image, _, semantic = scene(1)
    coarse = corrupt(semantic, "dilated", 1)
    coarse[:5, :5] = 255
    predictor = SamPredictor(tiny_engine.model) if kind == "SamPredictor" else EnginePredictor(tiny_engine)
    generator = SamAutomaticMaskGenerator(tiny_engine.model, points_per_side=4, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0)  # fmt: skip
    refined = refine_masks(image, coarse, predictor, generator=generator)
    assert refined.shape == coarse.shape and refined.dtype == coarse.dtype
    assert set(np.unique(refined)) <= set(np.unique(coarse)) | {0}
    assert (refined[:5, :5] == 255).all()


def test_refine_and_eval_on_the_command_line(tmp_path, capsys):
    from PIL import Image

    from usam_backend.cli import main

    data, masks, gt, out = (tmp_path / name for name in ("data", "masks", "gt", "out"))
    for folder in (data, masks, gt):
        folder.mkdir()
    palette = [v for i in range(256) for v in ((i * 40) % 256, (i * 90) % 256, (i * 150) % 256)]
    for seed in (0, 1):
        image, _, semantic = scene(seed)
        Image.fromarray(image).save(data / f"s{seed}.jpg")
        coarse = Image.fromarray(corrupt(semantic, "dilated", seed))
        coarse.putpalette(palette)
        coarse.save(masks / f"s{seed}.png")
        Image.fromarray(semantic).save(gt / f"s{seed}.png")
    image, _, semantic = scene(2)
    Image.fromarray(image).save(data / "grey16.png")
    Image.fromarray(semantic.astype(np.uint16) * 1000 // 1000).save(masks / "grey16.png")
    Image.fromarray(image).save(data / "lonely.png")  # no map
    Image.fromarray(semantic[:50]).save(masks / "small.png")
    Image.fromarray(image).save(data / "small.png")  # map of another size

    args = ["refine", "--data", str(data), "--mask", str(masks), "--outdir", str(out), "--sam", "tiny", "--viz"]
    assert main([*args, "--global-points", "4"]) == 1  # the unmatched and mismatched are listed, not fatal
    captured = capsys.readouterr()
    assert "lonely.png: no coarse map" in captured.err and "small.png: the map is" in captured.err
    assert "refined 3 map(s)" in captured.out
    refined = Image.open(out / "s0.png")
    assert refined.mode == "P" and refined.getpalette()[:30] == palette[:30]
    assert Image.open(out / "grey16.png").mode in ("I;16", "I")
    assert Image.open(out / "viz" / "s0.png").size == (3 * SIZE + 16, SIZE)
    assert main([*args, "--no-global"]) == 1
    assert "3 already there" in capsys.readouterr().out  # resumable

    report = tmp_path / "eval.json"
    assert main(["eval", "masks", "--pred", str(out), "--gt", str(gt), "--baseline", str(masks), "--json",
                 str(report)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "mIoU" in table and "baseline mIoU" in table and "change" in table
    import json

    numbers = json.loads(report.read_text())
    assert numbers["pred"]["images"] == 2 and 0.0 <= numbers["pred"]["miou"] <= 1.0
    assert numbers["baseline"]["miou"] < 1.0  # the dilated coarse maps


def test_eval_masks_counts_like_a_hand_computation():
    from usam_backend.tools.evaluate import Confusion

    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 1, 2, 0]])
    confusion = Confusion(ignore=255)
    confusion.add(pred, gt)
    metrics = confusion.metrics()
    # class 0: tp 3, fp 1 (a 1 predicted 0), fn 1 -> 3/5; class 1: tp 3, fp 2, fn 1 -> 3/6; class 2: tp 1, fn 1 -> 1/2
    assert metrics["iou"] == {0: 0.6, 1: 0.5, 2: 0.5}
    assert metrics["miou"] == pytest.approx((0.6 + 0.5 + 0.5) / 3) and metrics["pixel_accuracy"] == 7 / 10


def test_the_automatic_masks_answer_none_where_no_mask_passes(tiny_engine):
    from usam_backend.sam.generator import AutomaticMasks
    from usam_backend.systems.uosam import GENERATOR_OPTIONS

    image, _, _ = scene(3)
    strict = {**GENERATOR_OPTIONS, "points_per_side": 4, "pred_iou_thresh": 1.1}  # nothing can pass
    with pytest.raises(IndexError):  # what segment_anything itself does
        SamAutomaticMaskGenerator(tiny_engine.model, **strict).generate(image)
    assert AutomaticMasks(tiny_engine, **strict).generate(image) == []


@pytest.fixture
def served(tmp_path, trained_head):
    from PIL import Image

    from helpers import WebHost

    image, _, _ = scene(4)
    (tmp_path / "www").mkdir()
    Image.fromarray(image).save(tmp_path / "www" / "a.png")
    host = WebHost(tmp_path / "www")
    trained_head.save(tmp_path / "models" / "heads" / "head.pt")
    yield host, tmp_path
    host.stop()


BRUSH_CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" smart="true">
<Label value="tomato"/><Label value="sky"/></BrushLabels></View>"""


def backend_for(tmp_path, **extra):
    from usam_backend.core.settings import Settings
    from usam_backend.server.service import Backend

    return Backend(Settings(sam_type="tiny", device="cpu", points=64, cache_dir=tmp_path / "cache",
                            model_dir=tmp_path / "models", allowed_hosts=("127.0.0.1",), **extra))  # fmt: skip


def test_a_smart_brush_stroke_comes_back_refined_with_its_label(served):
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    from usam_backend.server.service import PredictRequest

    host, tmp_path = served
    backend = backend_for(tmp_path)
    strokes = []
    for box in ((20, 20, 60, 50), (50, 40, 80, 70)):  # two overlapping rough strokes of one label
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
        strokes.append({
            "id": f"s{x0}", "type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": "manual",
            "original_width": SIZE, "original_height": SIZE, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["sky"]},
        })  # fmt: skip
    request = PredictRequest(
        tasks=[{"id": 3, "data": {"image": f"{host.url}/a.png"}}], label_config=BRUSH_CONFIG,
        params={"context": {"result": strokes}},
    )  # fmt: skip
    ((prediction,),) = [backend.predict(request)]
    regions = {region["id"]: region for region in prediction["result"]}
    assert set(regions) == {"s20", "s50"}  # each rough region answered under its own id: accepting replaces it
    for (x0, y0, x1, y1), rid in (((20, 20, 60, 50), "s20"), ((50, 40, 80, 70), "s50")):
        region = regions[rid]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["sky"]
        mask = decode_rle(region["value"]["rle"]).reshape(SIZE, SIZE, 4)[:, :, 3] > 127
        drawn = np.zeros((SIZE, SIZE), dtype=bool)
        drawn[y0:y1, x0:x1] = True
        if region["score"] == 0.0:  # SAM (random weights here) disagreed: the stroke stays as drawn
            assert np.array_equal(mask, drawn)

    bad = {"type": "brushlabels", "to_name": "image", "original_width": 3, "original_height": 3,
           "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["sky"]}}  # fmt: skip
    from usam_backend.labelstudio.interactive import PromptError

    with pytest.raises(PromptError, match="could not be read"):
        backend.predict(PredictRequest(tasks=request.tasks, label_config=BRUSH_CONFIG,
                                       params={"context": {"result": [bad]}}))  # fmt: skip


@pytest.mark.parametrize("mode", ["local", "both"])
def test_usam_refine_post_processes_predictions(served, mode, monkeypatch):
    from usam_backend.server.service import PredictRequest
    from usam_backend.systems import uosam

    monkeypatch.setattr(uosam, "CPU_GLOBAL_POINTS", 4)  # the plumbing, in seconds

    host, tmp_path = served
    request = PredictRequest(tasks=[{"id": 1, "data": {"image": f"{host.url}/a.png"}}], label_config=BRUSH_CONFIG)
    plain = backend_for(tmp_path, score_threshold=0.2).predict(request)[0]
    refined = backend_for(tmp_path, score_threshold=0.2, refine=mode).predict(request)[0]
    assert plain["result"] and refined["model_version"] == plain["model_version"]
    assert {r["value"]["brushlabels"][0] for r in refined["result"]} <= {"tomato", "sky"}
    assert all(r["original_width"] == SIZE for r in refined["result"])


def test_bench_refine_prints_the_cost_per_image_and_region(capsys):
    from usam_backend.cli import main

    assert main(["bench-refine", "--sam", "tiny", "--size", "256", "--objects", "4", "--global-points", "4"]) == 0
    out = capsys.readouterr().out
    assert "local, embedding cached" in out and "s per region" in out
    assert "local + global (4x4 points, 0 crop layers)" in out and "x the cached local step" in out


def test_thousands_of_specks_cost_their_statistics_not_a_mask_each():
    """Regions are kept as statistics until refined: 5,000 one-pixel regions and max_regions=4 make
    four region masks, each over its box, not 5,000 image-sized ones (120 MB here)."""
    import tracemalloc

    coarse = np.zeros((240, 100), dtype=np.uint8)
    coarse[0:200:2, 0:100:2] = 1  # 5,000 one-pixel regions, none touching another
    instances = np.zeros(coarse.shape, dtype=np.int32)
    for k, x in enumerate(range(0, 100, 25), start=1):  # and four larger ones, of different sizes
        coarse[210:230, x : x + 20 - k] = 2
        instances[210:230, x : x + 20 - k] = k
    image = np.zeros((*coarse.shape, 3), dtype=np.uint8)
    report = RefineReport()
    tracemalloc.start()
    try:
        refined = refine_masks(image, coarse, GeometricOracle(instances), report=report, min_region_area=1,
                               max_regions=4)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB"
    assert [r["area"] for r in report.regions] == [380, 360, 340, 320] and report.accepted == 4
    assert np.array_equal(refined, coarse)
