import math

import pytest
import torch

from training.losses import bad_points, mil_loss, mil_scores, pooled_k, top_k, uncertainty_loss


@pytest.mark.parametrize(("points", "a", "k"), [(100, 8, 13), (100, 100, 1), (10, 3, 4), (5, 1000, 1)])
def test_top_k(points, a, k):
    assert top_k(points, a) == k


def test_pooling_warm_up_narrows_from_every_point_to_top_k():
    assert [pooled_k(16, 2, epoch, 10) for epoch in range(12)] == [16, 15, 13, 12, 10, 9, 8, 6, 5, 3, 2, 2]
    assert [pooled_k(100, 13, epoch, 0) for epoch in range(3)] == [13, 13, 13]  # no warm-up: the paper's top-k
    assert pooled_k(100, 13, 0, 2.5) == 100 and pooled_k(100, 13, 2, 2.5) == 30 and pooled_k(100, 13, 3, 2.5) == 13


def test_mil_scores_average_the_top_k_points():
    logits = torch.tensor([[[1.0, 0.0], [3.0, -1.0], [2.0, 5.0]]])  # 1 image, 3 points, 2 classes
    assert mil_scores(logits, 2).tolist() == [[2.5, 2.5]]
    assert mil_scores(logits, 1).tolist() == [[3.0, 5.0]]


def test_mil_loss_is_cross_entropy_against_the_normalised_labels():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    targets = torch.tensor([[1.0, 1.0, 0.0]])
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    expected = -(0.5 * math.log(p[0]) + 0.5 * math.log(p[1]))
    assert mil_loss(logits, targets, 1).item() == pytest.approx(expected)


def test_bad_points_are_unsure_or_confidently_wrong():
    logits = torch.tensor([[[9.0, 0.0], [0.0, 0.0], [0.0, 9.0]]])  # sure class 0, unsure, sure class 1
    targets = torch.tensor([[1.0, 0.0]])
    assert bad_points(logits, targets, tau=0.5).tolist() == [[False, True, True]]


def test_uncertainty_loss_is_smallest_at_uniform():
    bad = torch.tensor([[True, False]])
    uniform = torch.zeros(1, 2, 4)
    peaked = torch.tensor([[[5.0, 0, 0, 0], [0, 0, 0, 0]]])
    assert uncertainty_loss(uniform, bad).item() == pytest.approx(math.log(4))
    assert uncertainty_loss(peaked, bad).item() > math.log(4)
    assert uncertainty_loss(peaked, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
