"""Interactive prompts: Label Studio's percent coordinates to pixels, and which mask a click, a
negative click or a box gets.

Random weights cannot show which mask a prompt returns, so SAM is measured with a deterministic
geometric ORACLE on the engine's batched prompt API (tests/video_scenes.py's answers: a positive
point gives the object under it, a negative point removes the object under it, a box gives the part
inside it of the object it covers most; one click gives three masks of different quality, ranked
by their scores). The image is not square, so x and y cannot be confused unnoticed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from video_scenes import box_pixels, low_res_logits, multimask_answers, prompt_answer

from usam_backend.labelstudio.config import parse_label_config
from usam_backend.labelstudio.interactive import PromptError, parse_prompt
from usam_backend.sam.engine import PromptBatch, SamEngine
from usam_backend.server.service import PredictRequest
from usam_backend.systems.prompts import segment_prompt

from helpers import WebHost, tiny_backend

H, W = 120, 200
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="tomato"/><Label value="Sky"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="tomato"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Sky"/></RectangleLabels>
</View>"""


def two_objects() -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, object ids HxW int32): object 1 top right (x 90-180, y 10-50), object 2
    bottom left (x 20-70, y 60-110). The click (40, 90) is on object 2; (90, 40), its x and y
    swapped, on object 1."""
    objects = np.zeros((H, W), np.int32)
    objects[10:50, 90:180] = 1
    objects[60:110, 20:70] = 2
    image = np.full((H, W, 3), 120, np.uint8)
    image[objects == 1] = (220, 40, 30)
    image[objects == 2] = (40, 90, 230)
    return image, objects


class PromptOracle:
    """ORACLE with the part of :class:`SamEngine` that ``segment_prompt`` uses: ``embed``, and the
    batched ``predict_prompts`` answering each prompt geometrically (``predict_prompt`` is the
    engine's own, over it). With ``multimask`` the three masks are a part of the answer, the answer
    and the answer grown, the answer at position ``best`` and scored highest."""

    predict_prompt = SamEngine.predict_prompt

    def __init__(self, image: np.ndarray, objects: np.ndarray, best: int = 1):
        self.image, self.objects, self.best = image, objects, best
        self.calls: list[dict] = []

    def embed(self, image: np.ndarray, *, use_cache: bool = True):
        assert np.array_equal(image, self.image), "the prompt is on another image"
        return "embedding"

    def predict_prompts(
        self, embedding, *, points=None, labels=None, boxes=None, mask_input=None, multimask=True, masks=True
    ) -> PromptBatch:
        assert embedding == "embedding"
        self.calls.append({"points": points, "labels": labels, "boxes": boxes, "multimask": multimask})
        n = len(points if points is not None else boxes)
        out_masks, out_scores = [], []
        for i in range(n):
            whole = prompt_answer(
                self.objects,
                None if points is None else points[i],
                None if labels is None else labels[i],
                None if boxes is None else boxes[i],
            )
            if multimask:
                three, scores = multimask_answers(whole)  # the answer at position 1
                out_masks.append(np.roll(three, self.best - 1, axis=0))
                out_scores.append(np.roll(scores, self.best - 1))
            else:
                out_masks.append(whole[None])
                out_scores.append(np.array([0.95], np.float32))
        stacked = np.stack(out_masks)
        logits = torch.as_tensor(np.stack([low_res_logits(m) for m in stacked]))
        return PromptBatch(stacked if masks else None, np.stack(out_scores), logits)


def click(x: float, y: float, positive: bool | None = True) -> dict:
    """A smart KeyPointLabels click as Label Studio sends it (percent of width and height);
    ``is_positive`` False marks a negative click (Alt-click), None leaves it out."""
    item = {
        "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": W,
        "original_height": H, "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["tomato"]},
    }  # fmt: skip
    if positive is not None:
        item["is_positive"] = positive
    return item


def rectangle(x: float, y: float, width: float, height: float) -> dict:
    return {
        "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": W,
        "original_height": H, "value": {"x": x, "y": y, "width": width, "height": height, "rectanglelabels": ["Sky"]},
    }  # fmt: skip


# --- Label Studio percent -> image pixels ------------------------------------------------------


def test_clicks_become_xy_pixels_and_negative_clicks_label_0():
    config = parse_label_config(CONFIG)
    prompt = parse_prompt([click(20, 75), click(45, 25, positive=False), click(99.5, 2.5, None)], config)
    points, labels, box = prompt.pixels(H, W)
    # x percent of the width (200), y percent of the height (120)
    assert points.dtype == np.float32 and points.tolist() == [[40, 90], [90, 30], [199, 3]]
    assert labels.tolist() == [1, 0, 1]  # is_positive missing: a positive click
    assert box is None
    assert (prompt.label.value, prompt.label.control, prompt.image) == ("tomato", "tag", "image")


def test_a_rectangle_becomes_an_xyxy_pixel_box():
    config = parse_label_config(CONFIG)
    prompt = parse_prompt([rectangle(10, 25, 30, 50)], config)
    points, labels, box = prompt.pixels(H, W)
    assert box.tolist() == [20, 30, 80, 90]  # x 10 % + 30 % of 200, y 25 % + 50 % of 120
    assert points.shape == (0, 2) and labels.shape == (0,)
    assert prompt.label.value == "Sky"
    with_click = parse_prompt([rectangle(10, 25, 30, 50), click(20, 75)], config).pixels(H, W)
    assert with_click[0].tolist() == [[40, 90]] and with_click[2].tolist() == [20, 30, 80, 90]
    assert prompt.pixels(2 * H, W)[2].tolist() == [20, 60, 80, 180]


def test_prompts_without_numbers_or_labels_are_refused():
    config = parse_label_config(CONFIG)
    with pytest.raises(PromptError, match="numeric x, y"):
        parse_prompt([{**click(20, 75), "value": {"x": "left", "y": 3, "keypointlabels": ["tomato"]}}], config)
    with pytest.raises(PromptError, match="no keypoint or rectangle"):
        parse_prompt([{"type": "keypointlabels", "to_name": "image", "value": {"x": 1, "y": 1}}], config)


# --- which mask segment_prompt returns ---------------------------------------------------------


@pytest.mark.parametrize("best", [0, 1, 2])
def test_one_click_gets_the_best_scoring_of_three_masks(best):
    image, objects = two_objects()
    oracle = PromptOracle(image, objects, best=best)
    found = segment_prompt(oracle, image, points=np.array([[40.0, 90.0]]), point_labels=np.array([1]))
    assert np.array_equal(found.mask, objects == 2)  # not its part (a half) nor its grown copy
    assert found.score == pytest.approx(0.95)
    (call,) = oracle.calls
    assert call["multimask"] is True and call["boxes"] is None
    assert call["points"].tolist() == [[[40, 90]]] and call["labels"].tolist() == [[1]]  # x, y: a batch of one


def test_points_are_passed_as_x_then_y():
    image, objects = two_objects()
    oracle = PromptOracle(image, objects)
    for (x, y), expected in (((90.0, 40.0), 1), ((40.0, 90.0), 2)):  # one point, and its x and y swapped
        found = segment_prompt(oracle, image, points=np.array([[x, y]]), point_labels=np.array([1]))
        assert np.array_equal(found.mask, objects == expected)


def test_several_points_or_a_box_get_one_mask():
    image, objects = two_objects()
    oracle = PromptOracle(image, objects)
    both = segment_prompt(oracle, image, points=np.array([[40.0, 90.0], [90.0, 40.0]]), point_labels=np.array([0, 1]))
    assert np.array_equal(both.mask, objects == 1)  # the negative click removes object 2
    assert oracle.calls[-1]["multimask"] is False
    box = np.array([20.0, 60.0, 50.0, 120.0])  # the left 30 of object 2's 50 columns
    boxed = segment_prompt(oracle, image, box=box)
    assert np.array_equal(boxed.mask, (objects == 2) & box_pixels(box, objects.shape))
    assert oracle.calls[-1]["multimask"] is False and oracle.calls[-1]["points"] is None
    assert oracle.calls[-1]["boxes"].tolist() == [box.tolist()]
    wide = np.array([0.0, 0.0, 200.0, 120.0])  # object 1 (3600 px) covers more of it than object 2 (2500 px)
    assert np.array_equal(segment_prompt(oracle, image, box=wide).mask, objects == 1)
    negative = segment_prompt(oracle, image, points=np.array([[120.0, 30.0]]), point_labels=np.array([0]), box=wide)
    assert np.array_equal(negative.mask, objects == 2)
    with pytest.raises(ValueError, match="at least one point or a box"):
        segment_prompt(oracle, image, points=np.zeros((0, 2)), point_labels=np.zeros(0))


# --- the interactive path: Label Studio's context in, a brush region out ------------------------


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A backend whose SAM is the ORACLE, and the two-object image served over HTTP."""
    image, objects = two_objects()
    (tmp_path / "www").mkdir()
    Image.fromarray(image).save(tmp_path / "www" / "two.png")
    host = WebHost(tmp_path / "www")
    backend = tiny_backend(tmp_path)
    oracle = PromptOracle(image, objects)
    monkeypatch.setattr(backend.tasks, "engine", lambda: oracle)
    task = {"id": 3, "data": {"image": f"{host.url}/two.png"}}

    def ask(*items: dict) -> tuple[dict, np.ndarray]:
        (prediction,) = backend.predict(
            PredictRequest([task], label_config=CONFIG, params={"context": {"result": list(items)}})
        )
        (region,) = prediction["result"]
        assert (region["original_width"], region["original_height"]) == (W, H)
        return region, decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127

    yield ask, objects, oracle
    host.stop()


def test_a_click_in_label_studio_gets_the_object_under_it(served):
    ask, objects, oracle = served
    region, mask = ask(click(20, 75))  # pixel (40, 90)
    assert np.array_equal(mask, objects == 2)
    assert region["value"]["brushlabels"] == ["tomato"] and region["from_name"] == "tag"
    assert region["score"] == pytest.approx(0.95)
    assert oracle.calls[-1]["points"].tolist() == [[[40, 90]]] and oracle.calls[-1]["multimask"] is True
    _, mask = ask(click(45, 100 / 3))  # pixel (90, 40)
    assert np.array_equal(mask, objects == 1)


def test_a_negative_click_in_label_studio_removes_the_object_under_it(served):
    ask, objects, oracle = served
    _, mask = ask(click(45, 100 / 3), click(20, 75, positive=False))  # on object 1, and not object 2
    assert np.array_equal(mask, objects == 1)
    assert oracle.calls[-1]["labels"].tolist() == [[1, 0]]
    _, mask = ask(click(20, 75, positive=False), click(45, 100 / 3))  # the order does not matter
    assert np.array_equal(mask, objects == 1)
    _, mask = ask(rectangle(0, 0, 100, 100), click(60, 25, positive=False))  # the whole image, not object 1
    assert np.array_equal(mask, objects == 2)


def test_a_box_in_label_studio_gets_the_part_of_the_object_inside_it(served):
    ask, objects, oracle = served
    region, mask = ask(rectangle(10, 50, 15, 50))  # pixels (20, 60) - (50, 120)
    assert oracle.calls[-1]["boxes"].tolist() == [[20, 60, 50, 120]]
    assert np.array_equal(mask, (objects == 2) & box_pixels([20, 60, 50, 120], objects.shape))
    assert region["value"]["brushlabels"] == ["Sky"]
