import math

import pytest
import torch

from training.losses import bad_points, mil_loss, mil_scores, top_k, uncertainty_loss


@pytest.mark.parametrize(("points", "a", "k"), [(100, 8, 13), (100, 100, 1), (10, 3, 4), (5, 1000, 1)])
def test_top_k(points, a, k):
    assert top_k(points, a) == k


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
