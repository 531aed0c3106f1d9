"""Every label type: one prediction in the shape each control asks for (brush, polygon, rectangle,
ellipse), on images and frame sequences, with the same scores, ids and model version; smart-tool
answers in the project's shape; which controls are predicted and which are prompt tools."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from usam_backend.core.masks import mask_boxes
from usam_backend.core.shapes import Ellipse, drawable, ellipse_mask, polygon_iou, polygons_mask
from usam_backend.labelstudio.config import LabelConfigError, parse_label_config
from usam_backend.labelstudio.interactive import PromptError, parse_prompt
from usam_backend.server.service import PredictRequest

from conftest import scene
from helpers import WebHost, tiny_backend

H, W = 160, 240
LABELS = '<Label value="Sky" predicted_values="sky"/><Label value="tomato"/>'
ALL_SHAPES = f"""<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image">{LABELS}</BrushLabels>
<PolygonLabels name="poly" toName="image">{LABELS}</PolygonLabels>
<RectangleLabels name="rect" toName="image">{LABELS}<Label value="dog"/></RectangleLabels>
<EllipseLabels name="oval" toName="image">{LABELS}</EllipseLabels></View>"""
RECTANGLES = f"""<View><Image name="image" value="$image"/>
<RectangleLabels name="rect" toName="image" smart="true">{LABELS}</RectangleLabels>
<KeyPointLabels name="kp" toName="image" smart="true">{LABELS}</KeyPointLabels></View>"""
POLYGONS = f"""<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image">{LABELS}</PolygonLabels>
<RectangleLabels name="rect" toName="image" smart="true">{LABELS}</RectangleLabels></View>"""
SAM_EXAMPLE = """<View><Image name="image" value="$image" zoom="true"/>
<BrushLabels name="tag" toName="image"><Label value="Banana"/><Label value="tomato"/></BrushLabels>
<KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Banana"/><Label value="tomato"/></KeyPointLabels>
<RectangleLabels name="tag3" toName="image"><Label value="Banana"/><Label value="tomato"/></RectangleLabels></View>"""
SEQUENCE = f"""<View><Image name="frames" valueList="$frames"/>
<PolygonLabels name="poly" toName="frames">{LABELS}</PolygonLabels>
<RectangleLabels name="rect" toName="frames">{LABELS}</RectangleLabels></View>"""


def test_each_shape_control_is_predicted_and_prompt_rectangles_are_not():
    shapes = parse_label_config(ALL_SHAPES)
    assert {(label.control, label.kind) for label in shapes.labels} == {
        ("brush", "brushlabels"), ("poly", "polygonlabels"), ("rect", "rectanglelabels"), ("oval", "ellipselabels"),
    }  # fmt: skip
    rectangles = parse_label_config(RECTANGLES)
    assert {label.kind for label in rectangles.labels} == {"rectanglelabels"}  # a detection project
    assert set(rectangles.prompt_tools) == {"rect", "kp"}  # and its boxes and clicks prompt SAM
    polygons = parse_label_config(POLYGONS)  # rectangles with the polygons' labels only prompt them
    assert {label.kind for label in polygons.labels} == {"polygonlabels"} and set(polygons.prompt_tools) == {"rect"}
    example = parse_label_config(SAM_EXAMPLE)
    assert {label.kind for label in example.labels} == {"brushlabels"}
    other_labels = POLYGONS.replace('"tomato"/></RectangleLabels>', '"dog"/></RectangleLabels>')
    assert {label.kind for label in parse_label_config(other_labels).labels} == {"polygonlabels"}  # smart: a prompt
    plain = other_labels.replace('name="rect" toName="image" smart="true"', 'name="rect" toName="image"')
    assert {label.kind for label in parse_label_config(plain).labels} == {"polygonlabels", "rectanglelabels"}
    with pytest.raises(LabelConfigError, match="PolygonLabels"):
        parse_label_config('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i">'
                           '<Label value="cat"/></KeyPointLabels></View>')  # fmt: skip


@pytest.fixture
def host(tmp_path, trained_head):
    www = tmp_path / "www"
    www.mkdir()
    Image.fromarray(scene((H, W), [("tomato", (20, 30, 100, 130)), ("sky", (140, 30, 220, 130))], 7)).save(
        www / "two.png"
    )
    for t in range(4):
        x = 10 + 8 * t
        Image.fromarray(scene((96, 128), [("tomato", (x, 20, x + 40, 70))], seed=3)).save(www / f"{t}.png")
    trained_head.save(tmp_path / "models" / "heads" / "head.pt")
    served = WebHost(www)
    yield served, tmp_path
    served.stop()


def _pixels(points: list[list[float]], height: int, width: int) -> np.ndarray:
    return np.array([[x * width / 100, y * height / 100] for x, y in points])


def test_one_mask_in_every_shape_with_the_same_score_and_version(host):
    served, tmp_path = host
    backend = tiny_backend(tmp_path)
    task = {"id": 3, "data": {"image": f"{served.url}/two.png"}}
    (prediction,) = backend.predict(PredictRequest(tasks=[task], label_config=ALL_SHAPES))
    assert LabelInterface(ALL_SHAPES).validate_prediction(prediction, return_errors=True) == [], prediction
    by_type: dict[str, list[dict]] = {}
    for region in prediction["result"]:
        by_type.setdefault(region["type"], []).append(region)
    brushes = by_type["brushlabels"]
    assert brushes and {len(by_type[t]) for t in ("rectanglelabels", "ellipselabels")} == {len(brushes)}
    ious = []
    for brush in brushes:
        mask = decode_rle(brush["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
        label, score = brush["value"]["brushlabels"], brush["score"]
        same = {
            t: [r for r in regions if r["value"][t] == label and r["score"] == score] for t, regions in by_type.items()
        }
        rect = same["rectanglelabels"][0]["value"]
        x0, y0, x1, y1 = mask_boxes(mask[None])[0]  # the mask's own box, not padded
        assert (rect["x"], rect["y"]) == (round(100 * x0 / W, 4), round(100 * y0 / H, 4))
        assert (rect["width"], rect["height"]) == (round(100 * (x1 - x0) / W, 4), round(100 * (y1 - y0) / H, 4))
        assert rect["rotation"] == 0
        polygons = [_pixels(r["value"]["points"], H, W) for r in same["polygonlabels"]]
        assert all(r["value"]["closed"] for r in same["polygonlabels"])
        ious.append(polygon_iou(polygons, drawable(mask)))  # random weights: masks full of pinholes
        oval = same["ellipselabels"][0]["value"]
        drawn = ellipse_mask(Ellipse(oval["x"] * W / 100, oval["y"] * H / 100, oval["radiusX"] * W / 100,
                                     oval["radiusY"] * H / 100, oval["rotation"]), H, W)  # fmt: skip
        assert (drawn & mask).sum() / (drawn | mask).sum() > 0.5  # same place and extent; a mask is no ellipse
    assert min(ious) >= 0.95
    assert len({r["id"] for r in prediction["result"]}) == len(prediction["result"])
    assert prediction["model_version"].startswith("usam-")


def test_a_frame_sequence_gets_polygons_and_boxes_on_their_frames(host):
    served, tmp_path = host
    backend = tiny_backend(tmp_path)
    task = {"id": 4, "data": {"frames": [f"{served.url}/{t}.png" for t in range(4)]}}
    (prediction,) = backend.predict(PredictRequest(tasks=[task], label_config=SEQUENCE))
    assert prediction["result"], backend.failures
    assert LabelInterface(SEQUENCE).validate_prediction(prediction)
    frames = {(r["type"], r["item_index"]) for r in prediction["result"]}
    assert {index for _, index in frames} == {0, 1, 2, 3}
    assert {kind for kind, _ in frames} == {"polygonlabels", "rectanglelabels"}


def rectangle(x, y, w, h, label="tomato", **extra):
    return {"type": "rectanglelabels", "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]},
            "original_width": W, "original_height": H, **extra}  # fmt: skip


def click(x, y, label="tomato", **extra):
    return {"type": "keypointlabels", "value": {"x": x, "y": y, "keypointlabels": [label]},
            "original_width": W, "original_height": H, **extra}  # fmt: skip


def test_prompts_are_answered_in_the_projects_shape():
    rectangles = parse_label_config(RECTANGLES)
    assert parse_prompt([rectangle(10, 10, 20, 20, from_name="rect", to_name="image")], rectangles).label.kind == (
        "rectanglelabels"
    )
    assert parse_prompt([click(30, 40, from_name="kp", to_name="image")], rectangles).label.kind == "rectanglelabels"
    polygons = parse_label_config(POLYGONS)
    assert parse_prompt([rectangle(10, 10, 20, 20, from_name="rect", to_name="image")], polygons).label.kind == (
        "polygonlabels"
    )
    # Label Studio's SAM example sends a rectangle without from_name, to_name or id: its only rectangle tool
    prompt = parse_prompt([rectangle(50, 50, 10, 10)], parse_label_config(SAM_EXAMPLE))
    assert (prompt.label.kind, prompt.label.value, prompt.image) == ("brushlabels", "tomato", "image")
    two_tools = SAM_EXAMPLE.replace("</View>", '<RectangleLabels name="t4" toName="image"><Label value="tomato"/>'
                                               "</RectangleLabels></View>")  # fmt: skip
    with pytest.raises(PromptError, match="no from_name"):
        parse_prompt([rectangle(50, 50, 10, 10)], parse_label_config(two_tools))


def test_a_box_on_a_detection_project_is_answered_with_the_tight_box_of_sams_mask(host, tiny_engine):
    from usam_backend.systems.prompts import segment_prompt

    served, tmp_path = host
    backend = tiny_backend(tmp_path)
    task = {"id": 5, "data": {"image": f"{served.url}/two.png"}}
    context = {"result": [rectangle(5, 10, 40, 80, from_name="rect", to_name="image")]}
    (answer,) = backend.predict(PredictRequest(tasks=[task], label_config=RECTANGLES, params={"context": context}))
    image = np.asarray(Image.open(served.root / "two.png").convert("RGB"))
    expected = segment_prompt(tiny_engine, image, points=np.zeros((0, 2), np.float32),
                              point_labels=np.zeros(0, np.int64), box=np.array([12, 16, 108, 144]))  # fmt: skip
    (region,) = answer["result"]
    assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"] == ["tomato"]
    assert LabelInterface(RECTANGLES).validate_prediction(answer)
    x0, y0, _, y1 = mask_boxes(expected.mask[None])[0]
    assert (region["value"]["x"], region["value"]["y"]) == (round(100 * x0 / W, 4), round(100 * y0 / H, 4))
    assert region["value"]["height"] == round(100 * (y1 - y0) / H, 4)
    polygon_answer = backend.predict(PredictRequest(tasks=[task], label_config=POLYGONS, params={"context": {
        "result": [rectangle(5, 10, 40, 80, from_name="rect", to_name="image")]}}))[0]  # fmt: skip
    drawn = polygons_mask([_pixels(r["value"]["points"], H, W) for r in polygon_answer["result"]], H, W)
    clean = drawable(expected.mask)
    assert polygon_answer["result"] and (drawn & clean).sum() / (drawn | clean).sum() >= 0.95


def test_usam_refine_snaps_another_models_loose_boxes_and_polygons_to_the_objects():
    """Refinement measured with the geometric ORACLE of ``refine_oracle`` (random weights cannot show
    it): each object of a scene predicted as a box padded by 6 px and a polygon of the mask dilated by
    4 px; refined, each comes back in its own shape, closer to the object."""
    import cv2
    from refine_oracle import GeometricOracle
    from refine_oracle import scene as oracle_scene

    from usam_backend.core.shapes import mask_polygons
    from usam_backend.jobs.refine import refine_regions

    image, instances, _ = oracle_scene(1)
    size = instances.shape[0]
    regions, truth = [], {}
    for k in np.unique(instances)[1:]:
        mask = instances == k
        x0, y0, x1, y1 = mask_boxes(mask[None])[0]
        loose = (max(x0 - 6, 0), max(y0 - 6, 0), min(x1 + 6, size), min(y1 + 6, size))
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        common = {"to_name": "image", "original_width": size, "original_height": size, "score": 0.5}
        regions.append({**common, "id": f"r{k}", "from_name": "rect", "type": "rectanglelabels", "value": {
            "x": 100 * loose[0] / size, "y": 100 * loose[1] / size, "width": 100 * (loose[2] - loose[0]) / size,
            "height": 100 * (loose[3] - loose[1]) / size, "rotation": 0, "rectanglelabels": ["tomato"]}})  # fmt: skip
        (polygon,) = mask_polygons(grown)
        points = (100 * polygon / size).tolist()
        regions.append({**common, "id": f"p{k}", "from_name": "poly", "type": "polygonlabels",
                        "value": {"points": points, "closed": True, "polygonlabels": ["tomato"]}})  # fmt: skip
        truth[f"r{k}"], truth[f"p{k}"] = (x0, y0, x1, y1), mask
    keep = {"id": "c", "type": "choices", "from_name": "ok", "to_name": "image", "value": {"choices": ["yes"]}}
    refined = refine_regions(image, [*regions[::2], keep], GeometricOracle(instances), None)  # the boxes
    assert refined[-1] == keep and len(refined) == len(regions) // 2 + 1
    for before, after in zip(regions[::2], refined[:-1], strict=True):
        assert after["type"] == "rectanglelabels" and after["value"]["rectanglelabels"] == ["tomato"]
        box = [after["value"][key] * size / 100 for key in ("x", "y", "width", "height")]
        x0, y0, x1, y1 = truth[before["id"]]
        assert np.allclose([box[0], box[1], box[0] + box[2], box[1] + box[3]], [x0, y0, x1, y1], atol=1.0)
    refined = refine_regions(image, regions[1::2], GeometricOracle(instances), None)  # the polygons
    for before, after in zip(regions[1::2], refined, strict=True):
        mask = truth[before["id"]]
        drawn = polygons_mask([_pixels(after["value"]["points"], size, size)], size, size)
        coarse = polygons_mask([_pixels(before["value"]["points"], size, size)], size, size)
        iou_after = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou_after > 0.9 > (coarse & mask).sum() / (coarse | mask).sum()


def test_usam_refine_refines_a_frame_sequences_regions_on_their_frames(host, tiny_engine):
    """Plumbing with the tiny SAM: each frame with predicted regions is fetched and refined, and the
    regions come back in their shape on their own frame; a region beyond the sequence is an error."""
    import threading

    import httpx

    from usam_backend.core.errors import UsamError
    from usam_backend.core.settings import Settings
    from usam_backend.jobs.refine import _refine_sequence
    from usam_backend.labelstudio.media import fetcher_for
    from usam_backend.labelstudio.tasks import TaskPredictor

    served, tmp_path = host
    settings = Settings(sam_type="tiny", device="cpu", points=64, cache_dir=tmp_path / "cache",
                        model_dir=tmp_path / "models", allowed_hosts=("127.0.0.1",))  # fmt: skip
    task = {"id": 8, "data": {"frames": [f"{served.url}/{t}.png" for t in range(4)]}}
    common = {"from_name": "poly", "to_name": "frames", "original_width": 128, "original_height": 96}
    square = [[10, 20], [50, 20], [50, 70], [10, 70]]
    regions = [
        {**common, "id": "a", "type": "polygonlabels", "item_index": 1,
         "value": {"points": square, "closed": True, "polygonlabels": ["tomato"]}},
        {**common, "id": "b", "type": "rectanglelabels", "from_name": "rect", "item_index": 3,
         "value": {"x": 20, "y": 20, "width": 30, "height": 50, "rotation": 0, "rectanglelabels": ["tomato"]}},
    ]  # fmt: skip
    tasks = TaskPredictor(settings, lambda: tiny_engine, None, threading.Lock())  # type: ignore[arg-type]
    with httpx.Client() as client:
        fetcher = fetcher_for(settings, None, client)
        refined = _refine_sequence(task, "frames", regions, tasks, fetcher, tiny_engine, None)
        assert {(r["type"], r["item_index"]) for r in refined} <= {("polygonlabels", 1), ("rectanglelabels", 3)}
        assert any(r["item_index"] == 3 for r in refined) and all(r["original_width"] == 128 for r in refined)
        fetched = [path for path, _ in served.requests]
        assert "/1.png" in fetched and "/3.png" in fetched and "/0.png" not in fetched  # only frames with regions
        with pytest.raises(UsamError, match="frame 9 of a 4-frame"):
            _refine_sequence(task, "frames", [{**regions[0], "item_index": 9}], tasks, fetcher, tiny_engine, None)
