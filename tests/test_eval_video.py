"""``usam eval video`` against hand-computed DAVIS-2017 unsupervised scores: the proposals are the
ids 1 to the largest (an unused id is an empty proposal), padded to the number of true objects."""

from __future__ import annotations

import numpy as np
import pytest

from usam_backend.tools.eval_video import MAX_PROPOSALS, evaluate_sequence, proposals


def square(maps: np.ndarray, frames: range, top: int, left: int, value: int, size: int = 10) -> None:
    maps[frames.start : frames.stop, top : top + size, left : left + size] = value


def test_an_unused_id_is_an_empty_proposal_that_may_be_matched():
    gt = np.zeros((10, 60, 60), np.int32)
    square(gt, range(10), 5, 5, 1)  # A, on every frame
    square(gt, range(5), 30, 30, 2)  # B, on frames 0-4
    pred = np.zeros_like(gt)
    pred[gt == 1] = 1  # A exactly
    square(pred, range(5, 10), 40, 5, 3)  # a false positive on frames 5-9; id 2 unused
    result = evaluate_sequence(gt, pred)
    # B against the empty id 2: 0 on frames 0-4, 1 (both empty) on 5-9; against id 3: 0 everywhere
    assert [(o["id"], o["prediction"]) for o in result.objects] == [(1, 1), (2, 2)]
    assert result.objects[1]["J"] == {"mean": 0.5, "recall": 0.5, "decay": -1.0}
    assert result.j_mean == result.f_mean == 0.75


def test_fewer_proposals_than_objects_are_padded_with_empty_ones():
    gt = np.zeros((4, 60, 60), np.int32)
    square(gt, range(4), 5, 5, 1)
    square(gt, range(4), 5, 30, 2)
    square(gt, range(2), 30, 5, 3)  # on 2 of 4 frames
    pred = np.where(gt == 2, 1, 0).astype(np.int32)  # one proposal: object 2
    assert proposals(pred, 3) == ([1, None, None], 0)
    result = evaluate_sequence(gt, pred)
    assert [o["prediction"] for o in result.objects] == [None, 1, None]
    assert [o["J"]["mean"] for o in result.objects] == [0.0, 1.0, 0.5]
    assert result.j_mean == result.f_mean == pytest.approx(0.5)


def test_no_proposal_at_all_scores_every_object_against_an_empty_mask():
    gt = np.zeros((4, 30, 30), np.int32)
    square(gt, range(1), 5, 5, 1)
    result = evaluate_sequence(gt, np.zeros_like(gt))
    assert result.objects[0]["prediction"] is None and result.j_mean == result.f_mean == 0.75
    assert evaluate_sequence(np.zeros_like(gt), gt).objects == []  # no true object, nothing to score


@pytest.mark.parametrize(
    ("areas", "n_objects", "kept", "dropped"),
    [
        ({1: 5, 2: 5}, 0, [1, 2], 0),
        ({3: 5}, 2, [1, 2, 3], 0),  # ids 1 and 2 unused: empty proposals
        ({3: 5}, 4, [1, 2, 3, None], 0),
        ({k: k for k in range(1, 26)}, 2, list(range(6, 26)), 5),  # the 20 largest, in id order
        ({k: 1 for k in range(1, 26)}, 2, list(range(1, 21)), 5),  # ties: the lower id
        ({1: 9, 3: 9, 50: 9}, 2, [*range(1, 20), 50], 0),  # past 20: empty ids go first, the lowest kept
        ({1: 9, 50: 9}, 22, [*range(1, 20), 50, None, None], 0),
    ],
)
def test_past_twenty_ids_the_largest_proposals_keep_their_ids(areas, n_objects, kept, dropped):
    pred = np.zeros((1, 30, 30), np.int32)
    flat = pred.reshape(-1)
    start = 0
    for k, area in areas.items():
        flat[start : start + area] = k
        start += area
    found, left_out = proposals(pred, n_objects)
    assert found == kept and left_out == dropped
    assert len([p for p in found if p is not None]) <= MAX_PROPOSALS


def test_past_twenty_ids_an_empty_proposal_can_still_be_matched():
    gt = np.zeros((10, 60, 60), np.int32)
    square(gt, range(10), 5, 5, 1)
    square(gt, range(5), 30, 30, 2)
    pred = np.where(gt == 1, 30, 0).astype(np.int32)  # A as id 30: DAVIS would stop here
    square(pred, range(5, 10), 40, 5, 31)
    result = evaluate_sequence(gt, pred)
    assert result.objects[0]["prediction"] == 30 and result.objects[1]["prediction"] in range(1, 30)
    assert result.j_mean == 0.75 and result.dropped == 0
