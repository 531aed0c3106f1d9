"""End to end on the tiny SAM: image -> labelled regions, and agreement with the naive path."""

import dataclasses

import numpy as np
import pytest

from usam_backend.core.errors import HeadError
from usam_backend.core.masks import low_res_nms, mask_boxes, mask_iou, mask_nms
from usam_backend.core.timing import StageTimer
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.tools.bench import compare, naive_candidates, naive_segment, nms_crossings


def test_image_to_labelled_regions(tiny_engine, trained_head, two_object_image):
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.6, nms_iou=0.5)
    timer = StageTimer()
    regions = segmenter.segment(two_object_image, timer=timer)
    assert len(regions) > 0
    assert regions.masks.shape[1:] == (160, 240) and regions.masks.dtype == bool
    assert set(regions.labels) <= {"tomato", "sky"}
    assert (regions.scores >= 0.6).all() and (np.diff(regions.scores) <= 0).all()
    assert regions.masks.reshape(len(regions), -1).any(axis=1).all()
    boxes = mask_boxes(regions.masks)
    for i in range(len(regions)):
        for j in range(i):
            assert mask_iou(regions.masks[i], boxes[i], regions.masks[j], boxes[j]) <= 0.5
    label_map = regions.label_map()
    assert label_map.shape == (160, 240) and label_map.max() <= 2
    assert set(timer.seconds) == {"encode", "decode", "head", "masks", "nms"}


def test_only_requested_classes_are_emitted(tiny_engine, trained_head, two_object_image):
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.5)
    regions = segmenter.segment(two_object_image, classes={"sky"})
    assert len(regions) > 0 and set(regions.labels) == {"sky"}


def test_no_known_class_gives_empty_regions(tiny_engine, trained_head, two_object_image):
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.5)
    regions = segmenter.segment(two_object_image, classes={"a label the head does not know"})
    assert len(regions) == 0 and regions.image_size == (160, 240)
    assert not regions.label_map().any()


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_our_path_gives_the_naive_paths_output(tiny_engine, trained_head, two_object_image, threshold):
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=threshold)
    ours = segmenter.segment(two_object_image)
    naive = naive_segment(segmenter, two_object_image, StageTimer())
    agreement = compare(ours, naive)
    assert agreement["agree"], agreement
    assert len(ours) > 0


def test_the_bench_tells_candidates_that_differ_from_nms_that_differs(tiny_engine, trained_head, two_object_image):
    """``usam bench``'s explanation of a difference after NMS: the same candidates, and the pairs whose
    IoU crosses the threshold between 256x256 and image size (none at a threshold of 1)."""
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.3, nms_iou=0.5)
    found = naive_candidates(segmenter, two_object_image, StageTimer())
    assert len(found) > 2
    same = nms_crossings(segmenter, two_object_image, found)
    assert same["candidates_agree"] and same["candidates"] == len(found) and same["nms_crossings"] >= 0
    segmenter.nms_iou = 1.0  # no pair overlaps by more at either resolution: nothing crosses
    assert nms_crossings(segmenter, two_object_image, found)["nms_crossings"] == 0
    relabelled = dataclasses.replace(found, class_ids=(found.class_ids + 1) % 2)
    assert nms_crossings(segmenter, two_object_image, relabelled) == {"candidates_agree": False}
    fewer = found.select(np.arange(1, len(found)))
    assert nms_crossings(segmenter, two_object_image, fewer) == {"candidates_agree": False}


def test_head_for_another_sam_is_refused(tiny_engine, trained_head):
    other = type(trained_head)(trained_head.net, trained_head.config, trained_head.class_names, {"sam_type": "vit_b"})
    with pytest.raises(HeadError, match="trained on vit_b"):
        SemanticSegmenter(tiny_engine, other)


def test_streamed_survivors_are_the_segment_regions(tiny_engine, trained_head, two_object_image):
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.2, nms_iou=1.0)
    regions = segmenter.segment(two_object_image)
    survivors = segmenter.survivors(tiny_engine.embed(two_object_image))
    streamed = [(survivors.mask(i), survivors.class_ids[i]) for i in range(len(survivors))]
    streamed = [(mask, class_id) for mask, class_id in streamed if mask.any()]
    assert len(regions) > 1 and len(streamed) == len(regions)
    for (mask, class_id), expected_mask, expected_class in zip(streamed, regions.masks, regions.class_ids, strict=True):
        assert class_id == expected_class and np.array_equal(mask, expected_mask)


def test_masks_only_for_kept_points_and_only_survivors_upscaled_one_at_a_time(
    tiny_engine, trained_head, two_object_image, monkeypatch
):
    """SAM's low-res masks are made for the grid points over the threshold only; of those, only the
    survivors of low-res NMS are brought to image size, each when it is asked for, alone."""
    segmenter = SemanticSegmenter(tiny_engine, trained_head, points=64, score_threshold=0.7, nms_iou=0.9)
    probs = trained_head.predict_proba(tiny_engine.point_embeddings(two_object_image, 64))
    kept = int((probs.max(axis=1) >= 0.7).sum())
    masked: list[int] = []  # points per low-res mask call
    upscaled: list[int] = []  # masks per upscaling call
    low_res_logits, postprocess_masks = tiny_engine.low_res_logits, tiny_engine.model.postprocess_masks

    def counted_low_res(chunk, index):
        masked.append(len(index))
        return low_res_logits(chunk, index)

    def counted_upscale(masks, *args, **kwargs):
        upscaled.append(masks.shape[0])
        return postprocess_masks(masks, *args, **kwargs)

    monkeypatch.setattr(tiny_engine, "low_res_logits", counted_low_res)
    monkeypatch.setattr(tiny_engine.model, "postprocess_masks", counted_upscale)
    survivors = segmenter.survivors(tiny_engine.embed(two_object_image))
    assert 0 < kept < 64 and sum(masked) == kept
    assert 1 < len(survivors) < kept and upscaled == []  # nothing at image size yet
    for i in range(len(survivors)):
        assert survivors.mask(i).shape == (160, 240)
        assert upscaled == [1] * (i + 1)


def test_low_res_nms_decides_as_mask_nms():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 64, 64), dtype=bool)
    for mask in masks:
        x0, y0 = rng.integers(0, 48, size=2)
        x1, y1 = x0 + rng.integers(4, 16), y0 + rng.integers(4, 16)
        mask[y0:y1, x0:x1] = True
    masks[7] = False  # an empty mask is never kept
    scores = rng.random(40).astype(np.float32)
    for threshold in (0.1, 0.3, 0.5, 0.9):
        expected = [int(i) for i in mask_nms(masks, scores, threshold) if masks[i].any()]
        assert low_res_nms(masks, scores, threshold).tolist() == expected
