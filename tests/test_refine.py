"""UO-SAM refinement. Random weights cannot show that refinement helps, so its quality is measured
with a deterministic geometric ORACLE over synthetic scenes: an object with SamPredictor's interface
that answers a prompt with the true shape under it (plus plausible wrong alternatives among its
three masks), and a mask generator that answers with the true shapes plus over-segmented pieces.
It is a measuring instrument for the algorithm, not a stand-in for SAM. The tiny random SAM
covers the plumbing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from usam_backend import EnginePredictor, refine_masks
from usam_backend.systems.uosam import RefineReport
from usam_backend.tools.evaluate import miou

SIZE = 160


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, instance map, semantic map): 5 non-touching objects of 3 classes on background."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((SIZE, SIZE), dtype=np.int32)
    semantic = np.zeros((SIZE, SIZE), dtype=np.uint8)
    image = np.full((SIZE, SIZE, 3), 120, dtype=np.uint8)
    cells = [(r, c) for r in range(3) for c in range(3)]
    for k, index in enumerate(rng.choice(len(cells), size=5, replace=False), start=1):
        r, c = cells[index]
        cy, cx = 27 + r * 53, 27 + c * 53
        hy, hx = rng.integers(12, 22, size=2)
        shape = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if k % 2:
            cv2.ellipse(shape, (int(cx), int(cy)), (int(hx), int(hy)), float(rng.integers(0, 90)), 0, 360, 1, -1)
        else:
            shape[cy - hy : cy + hy, cx - hx : cx + hx] = 1
        region = shape.astype(bool)
        instances[region] = k
        semantic[region] = 1 + k % 3
        image[region] = rng.integers(0, 255, size=3)
    return image, instances, semantic


class GeometricOracle:
    """ORACLE with SamPredictor's interface: a point prompt answers with the true object under the
    positive point, a box alone with the object it overlaps most; multimask outputs are [a part of
    it, the object, the object grown into its surroundings], scored so the object wins."""

    def __init__(self, instances: np.ndarray):
        self.instances = instances
        self.images = 0

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        assert image.shape[:2] == self.instances.shape
        self.images += 1

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        target = 0
        if point_coords is not None:
            for (x, y), label in zip(point_coords, point_labels, strict=True):
                if label == 1 and self.instances[int(y), int(x)]:
                    target = int(self.instances[int(y), int(x)])
                    break
        if not target and box is not None:
            x0, y0, x1, y1 = (int(v) for v in box)
            ids, counts = np.unique(self.instances[y0:y1, x0:x1], return_counts=True)
            counts[ids == 0] = 0
            target = int(ids[np.argmax(counts)]) if counts.max() else 0
        whole = self.instances == target if target else np.zeros(self.instances.shape, dtype=bool)
        part = whole.copy()
        if whole.any():
            xs = np.nonzero(whole)[1]
            part[:, (xs.min() + xs.max()) // 2 :] = False
        grown = cv2.dilate(whole.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
        masks = np.stack([part, whole, grown]) if multimask_output else whole[None]
        scores = np.array([0.6, 0.95, 0.5] if multimask_output else [0.95], dtype=np.float32)
        low_res = np.stack([cv2.resize(m.astype(np.float32), (256, 256)) * 20 - 10 for m in masks])
        return masks, scores, low_res


class WrongOracle(GeometricOracle):
    """ORACLE that answers every prompt with a confident mask somewhere else."""

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        masks, scores, low_res = super().predict(point_coords, point_labels, box, mask_input, multimask_output)
        return np.roll(masks, SIZE // 2, axis=(1, 2)), scores, low_res


class OracleGenerator:
    """ORACLE with SamAutomaticMaskGenerator's interface: every true object, and each one cut in
    two pieces (over-segmentation)."""

    def __init__(self, instances: np.ndarray):
        self.instances = instances

    def generate(self, image: np.ndarray) -> list[dict]:
        records = []
        for k in np.unique(self.instances)[1:]:
            whole = self.instances == k
            top = whole.copy()
            ys = np.nonzero(whole)[0]
            top[(ys.min() + ys.max()) // 2 :] = False
            for mask in (whole, top, whole & ~top):
                records.append({"segmentation": mask, "area": int(mask.sum())})
        return records


def corrupt(semantic: np.ndarray, how: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kernel = np.ones((9, 9), np.uint8)
    if how == "dilated":
        out = semantic.copy()
        for c in np.unique(semantic)[1:]:
            out[cv2.dilate((semantic == c).astype(np.uint8), kernel).astype(bool)] = c
        return out
    if how == "eroded":
        out = np.zeros_like(semantic)
        for c in np.unique(semantic)[1:]:
            out[cv2.erode((semantic == c).astype(np.uint8), kernel).astype(bool)] = c
        return out
    if how == "shifted":
        return np.roll(semantic, (6, -5), axis=(0, 1))
    if how == "noisy edges":
        edges = cv2.dilate(cv2.Canny(semantic * 60, 1, 1), np.ones((7, 7), np.uint8)).astype(bool)
        flip = edges & (rng.random(semantic.shape) < 0.5)
        out = semantic.copy()
        out[flip] = np.where(semantic[flip] > 0, 0, np.roll(semantic, 4, axis=1)[flip])
        return out
    raise ValueError(how)


CORRUPTIONS = ["dilated", "eroded", "shifted", "noisy edges"]


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
    assert AutomaticMasks(tiny_engine.model, **strict).generate(image) == []


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
    from usam_backend.systems.uosam import GENERATOR_OPTIONS

    monkeypatch.setitem(GENERATOR_OPTIONS, "points_per_side", 4)  # the paper's 64 x 64 and crops: minutes on CPU
    monkeypatch.setitem(GENERATOR_OPTIONS, "crop_n_layers", 0)

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
    assert "local, embedding cached" in out and "s per region" in out and "local + global (4x4 points)" in out


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
