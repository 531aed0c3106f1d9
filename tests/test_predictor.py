"""The batched prompt API and EnginePredictor give what segment_anything's own SamPredictor gives."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

from usam_backend import EnginePredictor


@pytest.fixture
def both(tiny_engine, two_object_image):
    reference = SamPredictor(tiny_engine.model)
    reference.set_image(two_object_image)
    ours = EnginePredictor(tiny_engine)
    ours.set_image(two_object_image)
    return reference, ours


PROMPTS = {
    "one click": {"point_coords": np.array([[40.0, 50.0]]), "point_labels": np.array([1])},
    "click and negative click": {
        "point_coords": np.array([[40.0, 50.0], [90.0, 20.0]]), "point_labels": np.array([1, 0]),
    },
    "box": {"box": np.array([10.0, 20.0, 70.0, 90.0])},
    "box and click, one mask": {
        "box": np.array([10.0, 20.0, 70.0, 90.0]), "point_coords": np.array([[30.0, 40.0]]),
        "point_labels": np.array([1]), "multimask_output": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(PROMPTS))
def test_engine_predictor_matches_sam_predictor(both, name):
    reference, ours = both
    expected = reference.predict(**PROMPTS[name])
    found = ours.predict(**PROMPTS[name])
    for ref, got in zip(expected, found, strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.mean(found[0] != expected[0]) < 1e-4  # masks: thresholded logits, float noise at the edge only
    np.testing.assert_allclose(found[1], expected[1], atol=1e-4)
    np.testing.assert_allclose(found[2], expected[2], atol=1e-3)


def test_a_cascade_pass_with_mask_input_matches(both):
    reference, ours = both
    prompt = {"point_coords": np.array([[40.0, 50.0]]), "point_labels": np.array([1])}
    _, scores, logits = reference.predict(**prompt)
    best = logits[int(np.argmax(scores))][None]
    expected = reference.predict(**prompt, mask_input=best, multimask_output=False)
    found = ours.predict(**prompt, mask_input=best, multimask_output=False)
    np.testing.assert_allclose(found[1], expected[1], atol=1e-4)
    np.testing.assert_allclose(found[2], expected[2], atol=1e-3)


def test_set_image_reuses_the_cached_embedding(tiny_engine, two_object_image):
    predictor = EnginePredictor(tiny_engine)
    predictor.set_image(two_object_image)
    before = tiny_engine.encoder_calls
    predictor.set_image(two_object_image.copy())
    assert tiny_engine.encoder_calls == before


def test_a_batch_of_prompts_is_one_decoder_call_with_per_prompt_results(tiny_engine, two_object_image, both):
    reference, _ = both
    embedding = tiny_engine.embed(two_object_image)
    boxes = np.array([[10.0, 20.0, 70.0, 90.0], [50.0, 5.0, 120.0, 60.0], [0.0, 0.0, 30.0, 30.0]])
    batch = tiny_engine.predict_prompts(embedding, boxes=boxes, multimask=False)
    assert batch.masks is not None and batch.masks.shape == (3, 1, *two_object_image.shape[:2])
    assert batch.iou_predictions.shape == (3, 1) and tuple(batch.low_res_logits.shape) == (3, 1, 256, 256)
    for i, box in enumerate(boxes):
        _, scores, _ = reference.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(batch.iou_predictions[i], scores, atol=1e-4)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({}, "needs points, boxes or mask_input"),
        ({"boxes": np.zeros((2, 4)), "points": np.zeros((3, 1, 2)), "labels": np.ones((3, 1))}, "same number"),
        ({"points": np.zeros((2, 1, 2))}, "labels must be"),
    ],
)
def test_malformed_prompts_say_what_is_wrong(tiny_engine, two_object_image, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.predict_prompts(tiny_engine.embed(two_object_image), **prompt)


def test_predict_before_set_image_is_a_clear_error(tiny_engine):
    with pytest.raises(RuntimeError, match="set_image"):
        EnginePredictor(tiny_engine).predict(box=np.array([0, 0, 5, 5]))


def test_predict_boxes_is_predict_per_box_in_one_batch(both, two_object_image):
    reference, ours = both
    image = two_object_image
    boxes = np.array([[20, 30, 100, 130], [140, 30, 220, 130], [0, 0, 60, 60]], dtype=np.float32)
    masks, scores = ours.predict_boxes(boxes)
    assert masks.shape == (3, *image.shape[:2]) and masks.dtype == bool and scores.shape == (3,)
    for i, box in enumerate(boxes):
        one, score, _ = reference.predict(box=box, multimask_output=False)  # segment_anything's own
        assert np.mean(one[0] != masks[i]) < 1e-3  # the same arithmetic, batched
        assert score[0] == pytest.approx(scores[i], abs=1e-4)
