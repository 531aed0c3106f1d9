"""End to end on the tiny SAM: image -> labelled regions, and agreement with the naive path."""

import numpy as np
import pytest

from usam_backend.core.errors import HeadError
from usam_backend.core.masks import mask_boxes, mask_iou
from usam_backend.core.timing import StageTimer
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.tools.bench import compare, naive_segment


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


def test_head_for_another_sam_is_refused(tiny_engine, trained_head):
    other = type(trained_head)(trained_head.net, trained_head.config, trained_head.class_names, {"sam_type": "vit_b"})
    with pytest.raises(HeadError, match="trained on vit_b"):
        SemanticSegmenter(tiny_engine, other)
