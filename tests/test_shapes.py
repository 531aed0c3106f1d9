"""Masks as polygons, boxes and ellipses: fidelity as COCO rasterises them."""

from __future__ import annotations

import numpy as np
import pytest

from usam_backend.core.shapes import (
    POLYGON_MIN_IOU,
    Ellipse,
    drawable,
    ellipse_mask,
    mask_ellipse,
    mask_polygons,
    polygon_iou,
    polygons_mask,
)


def _grid(height: int = 160, width: int = 240) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:height, 0:width]


def scenes() -> dict[str, np.ndarray]:
    """Masks of the shapes SAM gives: round, convex, with a hole, in parts, thin, ragged."""
    yy, xx = _grid()
    disk = (xx - 120) ** 2 + (yy - 80) ** 2 < 50**2
    ring = disk & ~((xx - 120) ** 2 + (yy - 80) ** 2 < 20**2)
    parts = disk.copy()
    parts[5:30, 5:60] = True
    thin = np.zeros_like(disk)
    thin[40:43, 10:200] = True
    ragged = disk ^ ((xx // 7 + yy // 5) % 3 == 0) & ((xx - 120) ** 2 + (yy - 80) ** 2 > 40**2)
    square = np.zeros_like(disk)
    square[20:30, 40:50] = True
    return {"disk": disk, "ring": ring, "parts": parts, "thin": thin, "ragged": ragged, "square": square}


@pytest.mark.parametrize("name", sorted(scenes()))
def test_polygons_keep_the_mask_at_the_stated_iou(name: str) -> None:
    mask = scenes()[name]
    polygons = mask_polygons(mask)
    assert polygons
    assert polygon_iou(polygons, mask) >= POLYGON_MIN_IOU
    for polygon in polygons:
        assert polygon.ndim == 2 and polygon.shape[1] == 2 and len(polygon) >= 3
        assert (polygon >= 0).all()
        assert (polygon[:, 0] <= mask.shape[1]).all() and (polygon[:, 1] <= mask.shape[0]).all()


def test_simplification_drops_points_a_straight_edge_does_not_need() -> None:
    square = scenes()["square"]
    (polygon,) = mask_polygons(square)
    assert len(polygon) == 4
    np.testing.assert_array_equal(polygons_mask([polygon], *square.shape), square)


def test_a_hole_is_bridged_and_stays_a_hole() -> None:
    ring = scenes()["ring"]
    (polygon,) = mask_polygons(ring)  # one region, as Label Studio polygons have no holes
    drawn = polygons_mask([polygon], *ring.shape)
    assert not drawn[80, 120]  # the centre of the hole
    assert drawn[80, 120 + 35]  # the ring itself


def test_each_part_gets_its_own_polygon_largest_first() -> None:
    parts = scenes()["parts"]
    polygons = mask_polygons(parts)
    assert len(polygons) == 2
    areas = [polygons_mask([p], *parts.shape).sum() for p in polygons]
    assert areas[0] > areas[1]


def test_absurd_coordinates_are_refused_before_they_reach_the_rasteriser() -> None:
    with pytest.raises(ValueError, match="not finite or beyond"):
        polygons_mask([np.array([[0, 0], [1e300, 0], [5, 5]])], 10, 10)
    with pytest.raises(ValueError, match="not finite or beyond"):
        polygons_mask([np.array([[0, 0], [np.nan, 0], [5, 5]])], 10, 10)


def test_specks_get_no_polygon() -> None:
    mask = np.zeros((50, 50), dtype=bool)
    mask[10, 10] = True
    mask[30:32, 30:32] = True
    assert mask_polygons(mask) == []


def test_specks_are_dropped_and_pinholes_filled_before_tracing() -> None:
    mask = scenes()["disk"].copy()
    mask[80, 120] = False  # a pinhole
    mask[70:76, 100:106] = False  # a hole of 36 pixels
    mask[2, 2] = True  # a speck
    clean = drawable(mask)
    assert clean[80, 120] and not clean[2, 2] and not clean[72, 102]
    assert polygon_iou(mask_polygons(mask), clean) >= POLYGON_MIN_IOU
    assert not polygons_mask(mask_polygons(mask), *mask.shape)[72, 102]  # the big hole stays a hole


def test_the_ellipse_of_a_filled_ellipse_is_itself() -> None:
    truth = Ellipse(120.0, 80.0, 70.0, 25.0, 30.0)
    found = mask_ellipse(ellipse_mask(truth, 160, 240))
    assert found is not None
    assert abs(found.cx - truth.cx) < 0.5 and abs(found.cy - truth.cy) < 0.5
    assert abs(found.rx - truth.rx) < 1.0 and abs(found.ry - truth.ry) < 1.0
    assert abs(found.rotation - truth.rotation) < 1.0
    assert mask_ellipse(np.zeros((5, 5), dtype=bool)) is None


def test_polygon_fidelity_over_the_test_scenes() -> None:
    """The README's figures: the scenes above and the objects of 8 refinement-oracle scenes."""
    from refine_oracle import scene

    masks = list(scenes().values())
    for seed in range(8):
        _, instances, _ = scene(seed)
        masks += [instances == k for k in np.unique(instances)[1:]]
    ious, points = [], []
    for mask in masks:
        polygons = mask_polygons(mask)
        ious.append(polygon_iou(polygons, drawable(mask)))
        points += [len(p) for p in polygons]
    print(f"\n{len(masks)} masks: polygon IoU mean {np.mean(ious):.4f}, worst {min(ious):.4f}; points per polygon "
          f"mean {np.mean(points):.1f}, median {np.median(points):.0f}, max {max(points)}")  # fmt: skip
    assert min(ious) >= POLYGON_MIN_IOU and np.mean(ious) >= 0.97
    assert np.median(points) <= 16  # simplified: a traced outline has hundreds
