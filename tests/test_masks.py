import numpy as np
import pytest

from usam_backend.core.masks import mask_boxes, mask_iou, mask_nms, mask_to_rle, rle_to_mask
from usam_backend.core.regions import Regions


def masks_from(*rows: list[str]) -> np.ndarray:
    return np.array([[[c == "#" for c in line] for line in m] for m in rows])


A = ["##..", "##..", "....", "...."]
B = ["###.", "##..", "....", "...."]  # overlaps A heavily
C = ["....", "....", "..##", "..##"]  # disjoint from A


@pytest.mark.parametrize(
    ("mask", "counts"),
    [
        (["##", ".."], [0, 1, 1, 1, 1]),  # column-major: (0,0)=1, (1,0)=0, (0,1)=1, (1,1)=0
        ([".."], [2]),
        (["##"], [0, 2]),
        (["#.", ".#"], [0, 1, 2, 1]),
    ],
)
def test_rle_matches_coco_layout(mask, counts):
    array = masks_from(mask)[0]
    rle = mask_to_rle(array)
    assert rle == {"size": list(array.shape), "counts": counts}
    assert np.array_equal(rle_to_mask(rle), array)


def test_rle_round_trip_random():
    mask = np.random.default_rng(0).random((37, 53)) > 0.6
    assert np.array_equal(rle_to_mask(mask_to_rle(mask)), mask)


def test_boxes_are_xyxy_exclusive():
    boxes = mask_boxes(masks_from(A, C, ["....", "....", "....", "...."]))
    assert boxes.tolist() == [[0, 0, 2, 2], [2, 2, 4, 4], [0, 0, 0, 0]]


def test_iou():
    a, b, c = masks_from(A, B, C)
    boxes = mask_boxes(masks_from(A, B, C))
    assert mask_iou(a, boxes[0], b, boxes[1]) == pytest.approx(4 / 5)
    assert mask_iou(a, boxes[0], c, boxes[2]) == 0.0


@pytest.mark.parametrize(
    ("scores", "threshold", "kept"),
    [
        ([0.9, 0.8, 0.7], 0.5, [0, 2]),  # B suppressed by A
        ([0.7, 0.8, 0.9], 0.5, [2, 1]),  # B wins over A
        ([0.9, 0.8, 0.7], 0.85, [0, 1, 2]),  # IoU 0.8 is allowed under a 0.85 threshold
    ],
)
def test_nms(scores, threshold, kept):
    assert mask_nms(masks_from(A, B, C), np.array(scores), threshold).tolist() == kept


def test_regions_validate_and_paint_label_map():
    masks = masks_from(A, B)
    regions = Regions(
        masks=masks,
        class_ids=np.array([0, 1]),
        scores=np.array([0.6, 0.9], dtype=np.float32),
        points=np.zeros((2, 2), dtype=np.float32),
        sam_scores=np.ones(2, dtype=np.float32),
        class_names=("cat", "dog"),
    )
    label_map = regions.label_map()
    assert label_map[0, 0] == 2  # the more confident dog wins the overlap
    assert label_map[0, 2] == 2 and label_map[3, 3] == 0
    assert regions.labels == ["cat", "dog"]
    assert len(regions.select(np.array([1]))) == 1
    with pytest.raises(ValueError, match="scores must have shape"):
        Regions(masks, np.array([0, 1]), np.zeros(3), np.zeros((2, 2)), np.zeros(2), ("cat", "dog"))
    with pytest.raises(ValueError, match="class_ids must index"):
        Regions(masks, np.array([0, 2]), np.zeros(2), np.zeros((2, 2)), np.zeros(2), ("cat", "dog"))


@pytest.mark.parametrize(
    "shape, fill",
    [((1, 1), "none"), ((1, 1), "all"), ((3, 5), "random"), ((40, 60), "block"), ((300, 400), "random"),
     ((7, 70_000), "all"), ((7, 70_000), "block")],
)  # fmt: skip
def test_brush_rle_is_label_studios_rle_byte_for_byte(shape, fill):
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    from usam_backend.core.masks import brush_rle

    mask = np.zeros(shape, dtype=bool)
    if fill == "all":
        mask[:] = True
    elif fill == "random":
        mask = np.random.default_rng(3).random(shape) > 0.5
    elif fill == "block":
        mask[shape[0] // 3 :, shape[1] // 4 :] = True
    assert brush_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)
    decoded = decode_rle(brush_rle(mask)).reshape(*shape, 4)[:, :, 3] > 127
    assert np.array_equal(decoded, mask)
