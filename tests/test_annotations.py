"""Label Studio results read back as regions (every image shape) and video tracks expanded frame by
frame as Label Studio's editor draws them."""

from __future__ import annotations

import numpy as np
import pytest

from usam_backend.core.masks import brush_rle
from usam_backend.labelstudio.annotations import (
    ProjectSchema,
    expand_keyframes,
    normalize_angle,
    read_results,
)

H, W = 40, 80


def _size(name: str, frame: int) -> tuple[int, int]:
    return H, W


def _one(result: dict, size=_size) -> object:
    read = read_results([result], task=7, size=size)
    assert not read.errors, read.errors
    (region,) = read.regions
    return region


def test_brush_decodes_to_the_mask_drawn() -> None:
    mask = np.zeros((H, W), dtype=bool)
    mask[5:20, 10:30] = True
    mask[25:30, 60:70] = True
    region = _one(
        {
            "id": "b",
            "type": "brushlabels",
            "from_name": "tag",
            "to_name": "image",
            "item_index": 3,
            "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": ["cat"]},
            "score": 0.4,
        }
    )
    assert (region.label, region.control, region.image, region.frame, region.shape) == (
        "cat",
        "tag",
        "image",
        3,
        "brush",
    )
    assert np.array_equal(region.mask, mask)
    assert region.box.tolist() == [10, 5, 70, 30]
    assert region.score == pytest.approx(0.4)


def test_rectangle_in_percent_becomes_its_pixels() -> None:
    value = {"x": 12.5, "y": 25.0, "width": 25.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["dog"]}
    region = _one({"type": "rectanglelabels", "to_name": "image", "value": value})
    assert region.box.tolist() == [10.0, 10.0, 30.0, 30.0]
    expected = np.zeros((H, W), dtype=bool)
    expected[10:30, 10:30] = True
    assert np.array_equal(region.mask, expected)


def test_rotated_rectangle_turns_about_its_top_left_corner_clockwise() -> None:
    # 20 x 10 px turned 90 degrees clockwise on screen about (40, 10): it now hangs down-left of that corner
    value = {"x": 50.0, "y": 25.0, "width": 25.0, "height": 25.0, "rotation": 90, "rectanglelabels": ["dog"]}
    region = _one({"type": "rectanglelabels", "to_name": "image", "value": value})
    assert region.box == pytest.approx([30.0, 10.0, 40.0, 30.0])
    assert region.mask.sum() == pytest.approx(200, abs=30)
    assert region.mask[15:25, 31:39].all() and not region.mask[:, 41:].any()


def test_polygon_points_are_percent_and_rasterised_as_coco() -> None:
    points = [[25.0, 25.0], [75.0, 25.0], [75.0, 75.0], [25.0, 75.0]]
    region = _one(
        {
            "type": "polygonlabels",
            "to_name": "image",
            "value": {"points": points, "closed": True, "polygonlabels": ["cat"]},
        }
    )
    assert region.box.tolist() == [20.0, 10.0, 60.0, 30.0]
    assert region.polygons[0].tolist() == [[20, 10], [60, 10], [60, 30], [20, 30]]
    assert 760 <= region.mask.sum() <= 861  # 40 x 20 px, COCO's rasteriser may take the far edges


def test_ellipse_radii_are_percent_of_width_and_height() -> None:
    value = {"x": 50.0, "y": 50.0, "radiusX": 25.0, "radiusY": 25.0, "rotation": 0, "ellipselabels": ["cat"]}
    region = _one({"type": "ellipselabels", "to_name": "image", "value": value})  # rx 20 px, ry 10 px
    assert region.box == pytest.approx([20.0, 10.0, 60.0, 30.0])
    assert region.mask.sum() == pytest.approx(np.pi * 20 * 10, rel=0.03)


def test_a_rectangle_labelled_by_a_separate_labels_result() -> None:
    results = [
        {"id": "r1", "type": "rectangle", "to_name": "image", "value": {"x": 0, "y": 0, "width": 10, "height": 10}},
        {"id": "r1", "type": "labels", "to_name": "image", "value": {"labels": ["bus"]}},
    ]
    read = read_results(results, task=1, size=_size)
    assert [r.label for r in read.regions] == ["bus"] and read.ignored == 1


def test_without_a_known_size_the_results_own_size_is_used() -> None:
    value = {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["a"]}
    read = read_results(
        [{"type": "rectanglelabels", "original_width": 10, "original_height": 6, "value": value}],
        task=1,
        size=lambda name, frame: None,
    )
    assert read.regions[0].mask.shape == (6, 10) and read.regions[0].box.tolist() == [0, 0, 5, 3]


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ({"id": "x1", "type": "polygonlabels", "value": {"points": [[1, 2]], "polygonlabels": ["a"]}}, "at least 3"),
        (
            {
                "id": "x2",
                "type": "rectanglelabels",
                "value": {"x": "a", "y": 0, "width": 1, "height": 1, "rectanglelabels": ["a"]},
            },
            "value.x",
        ),
        (
            {"id": "x3", "type": "brushlabels", "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["a"]}},
            "brush",
        ),
        ({"id": "x4", "type": "rectanglelabels", "value": {"x": 0, "y": 0, "width": 1, "height": 1}}, "no label"),
        ({"id": "x5", "type": "polygonlabels", "value": {"polygonlabels": ["a"]}}, "value.points is missing"),
        (
            {
                "id": "x6",
                "type": "brushlabels",
                "original_width": 9,
                "original_height": 9,
                "value": {"format": "rle", "rle": brush_rle(np.ones((9, 9), bool)), "brushlabels": ["a"]},
            },
            "9x9",
        ),
        ({"id": "x7", "type": "videorectangle", "value": {"sequence": [], "labels": ["a"]}}, "non-empty"),
        # COCO's rasteriser crashes the process on such coordinates: refused before it sees them
        (
            {
                "id": "x8",
                "type": "polygonlabels",
                "value": {"points": [[0, 0], [1e300, 0], [1e300, 1e300]], "polygonlabels": ["a"]},
            },
            "beyond",
        ),
        (
            {
                "id": "x9",
                "type": "videorectangle",
                "value": {
                    "labels": ["a"],
                    "framesCount": 1e12,
                    "sequence": [{"frame": 1, "x": 0, "y": 0, "width": 1, "height": 1}],
                },
            },
            "framesCount",
        ),
    ],
)
def test_a_malformed_result_is_an_error_naming_task_and_region_and_the_rest_is_kept(result, reason) -> None:
    good = {
        "id": "ok",
        "type": "rectanglelabels",
        "value": {"x": 0, "y": 0, "width": 5, "height": 5, "rectanglelabels": ["a"]},
    }
    read = read_results([result, good, "not a dict"], task=42, size=_size)
    assert [r.id for r in read.regions] == ["ok"]
    assert len(read.errors) == 1
    message = str(read.errors[0])
    assert f"task 42, region {result['id']}" in message and reason.lower() in message.lower(), message


def test_schema_reads_objects_and_every_label_in_order() -> None:
    schema = ProjectSchema.read(
        '<View><Image name="img" value="$image"/><Image name="seq" valueList="$frames"/>'
        '<Video name="vid" value="$video"/>'
        '<PolygonLabels name="p" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>'
        '<BrushLabels name="b" toName="seq"><Label value="dog"/><Label value="bird"/></BrushLabels>'
        '<Labels name="l" toName="vid"><Label value="car"/></Labels><VideoRectangle name="box" toName="vid"/></View>'
    )
    assert {n: (o.key, o.kind) for n, o in schema.objects.items()} == {
        "img": ("image", "image"),
        "seq": ("frames", "sequence"),
        "vid": ("video", "video"),
    }
    assert schema.labels == ("cat", "dog", "bird", "car")


# --- video tracks, as Label Studio's editor draws them ------------------------------------------------


def _key(frame: int, x: float, enabled: bool = True, rotation: float = 0.0) -> dict:
    return {
        "frame": frame,
        "enabled": enabled,
        "x": x,
        "y": 10.0,
        "width": 20.0,
        "height": 10.0,
        "rotation": rotation,
        "time": frame / 24,
    }


def test_keyframes_interpolate_linearly_and_disabled_ends_a_segment() -> None:
    drawn = expand_keyframes([_key(3, 0.0), _key(7, 40.0, enabled=False), _key(10, 80.0), _key(12, 60.0)], 14)
    # nothing before the first keyframe; 3..7 drawn (7 itself, disabled, too); 8 and 9 not; 10..14 drawn
    assert sorted(drawn) == [3, 4, 5, 6, 7, 10, 11, 12, 13, 14]
    assert [drawn[f]["x"] for f in (3, 4, 5, 6, 7)] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert drawn[11]["x"] == 70.0
    assert drawn[13]["x"] == drawn[14]["x"] == 60.0  # the last, enabled keyframe holds to the video's end


def test_last_keyframe_disabled_stops_there_and_frames_beyond_the_video_are_not_drawn() -> None:
    assert sorted(expand_keyframes([_key(2, 0.0), _key(4, 10.0, enabled=False)], 9)) == [2, 3, 4]
    assert sorted(expand_keyframes([_key(5, 0.0)], 6)) == [5, 6]
    assert sorted(expand_keyframes([_key(8, 0.0), _key(1, 0.0)], 4)) == [1, 2, 3, 4]  # unsorted input; 8 > 4


def test_rotation_is_interpolated_the_short_way_round() -> None:
    drawn = expand_keyframes([_key(1, 0.0, rotation=-170), _key(5, 0.0, rotation=170)], 5)
    assert drawn[2]["rotation"] == pytest.approx(-175)  # Label Studio's own example
    assert drawn[3]["rotation"] == pytest.approx(180)
    assert normalize_angle(-180) == 180 and normalize_angle(190) == -170


def test_a_huge_rotation_ends() -> None:
    drawn = expand_keyframes([_key(1, 0.0, rotation=1e308), _key(3, 0.0, rotation=-1e300)], 3)
    assert sorted(drawn) == [1, 2, 3] and abs(drawn[2]["rotation"]) <= 540  # no endless loop, a bounded angle


def test_a_videorectangle_becomes_a_track_of_pixel_boxes() -> None:
    result = {
        "id": "t1",
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "vid",
        "value": {
            "labels": ["car"],
            "framesCount": 6,
            "duration": 0.25,
            "sequence": [_key(2, 0.0), _key(4, 50.0, enabled=False)],
        },
    }
    read = read_results([result], task=3, size=lambda name, frame: (100, 200))
    (track,) = read.tracks
    assert (track.id, track.label, track.video) == ("t1", "car", "vid")
    assert sorted(track.boxes) == [2, 3, 4]
    assert track.boxes[3].tolist() == pytest.approx([50.0, 10.0, 90.0, 20.0])  # x 25 % of 200 px
