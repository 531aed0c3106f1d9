"""MIL on synthetic clustered bags: instance labels are recovered from image labels alone, stably."""

import numpy as np
import pytest

from training.metrics import average_precision, instance_map
from training.study import run_study
from training.synthetic import make_world, source_bags, target_bags


def test_average_precision_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.1]), np.array([False])))
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert instance_map(probs, np.array([0, 1, -1])) == pytest.approx(1.0)


def test_synthetic_bags_have_the_promised_structure():
    world = make_world(classes=3, dim=8, seed=0)
    train = source_bags(world, per_class=4, points=20)
    test = target_bags(world, images=6, points=20)
    assert train.bags.shape == (12, 20, 8) and train.bags.dtype == np.float32
    assert (train.targets.sum(axis=1) == 1).all()
    for bag_targets, labels in zip(train.targets, train.labels, strict=True):
        assert set(labels[labels >= 0]) == {int(bag_targets.argmax())}  # only the labelled object is in the bag
    assert test.targets.sum(axis=1).max() > 1  # test images hold several objects
    assert (test.labels == -1).any()


def test_teacher_and_student_recover_instance_labels_across_seeds():
    scores, chance = run_study(range(5), per_class=30, epochs=30)
    teacher, student = np.array(scores.teacher), np.array(scores.student)
    print(
        f"\ninstance mAP over 5 seeds: teacher {teacher.mean():.3f} ± {teacher.std():.3f}, "
        f"student {student.mean():.3f} ± {student.std():.3f}, chance {chance:.3f}"
    )
    assert teacher.mean() > chance + 0.4
    assert student.mean() > chance + 0.4
    assert student.mean() >= teacher.mean() - 0.01  # distillation does not hurt on average
    assert student.std() <= 0.03  # and the distilled learner is stable across seeds
