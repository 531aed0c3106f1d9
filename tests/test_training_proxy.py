"""The real-data bag proxy (scikit-learn's digits) and the pooling warm-up that keeps MIL from collapsing."""

import numpy as np
import pytest

from training.metrics import average_precision
from training.proxy import digit_proxy, load_digits_features
from training.train import TrainOptions, train_heads
from usam_backend.cli import main


def test_digit_bags_hold_one_to_three_classes_of_one_to_three_scans_among_background():
    proxy = digit_proxy(data_seed=2, classes=4, points=12, train_bags=30, test_bags=20)
    assert proxy.digits == (2, 3, 4, 5)
    assert proxy.train.bags.shape == (30, 12, 64) and proxy.test.bags.shape == (20, 12, 64)
    for part in (proxy.train, proxy.test):
        for targets, labels in zip(part.targets, part.labels, strict=True):
            present = np.flatnonzero(targets)
            assert 1 <= len(present) <= 3
            assert set(labels[labels >= 0]) == set(present)  # a bag's label is exactly its classes
            assert all(1 <= (labels == c).sum() <= 3 for c in present)
            assert (labels == -1).sum() >= 12 - 9
    x, y = load_digits_features()
    scans = {row.tobytes(): digit for row, digit in zip(x, y, strict=True)}
    for part in (proxy.train, proxy.test):  # real scans; class instances are their digit, background the others
        flat, labels = part.bags.reshape(-1, 64), part.labels.reshape(-1)
        digits = np.array([scans[row.tobytes()] for row in flat])
        assert (digits[labels >= 0] == np.array(proxy.digits)[labels[labels >= 0]]).all()
        assert not np.isin(digits[labels < 0], proxy.digits).any()
    train_scans = {row.tobytes() for row in proxy.train.bags.reshape(-1, 64)}
    assert not train_scans & {row.tobytes() for row in proxy.test.bags.reshape(-1, 64)}  # held-out scans


def _class_aps(pool_warmup: float, seed: int) -> list[float]:
    proxy = digit_proxy()
    heads = train_heads(
        proxy.train.bags, proxy.train.targets, proxy.class_names, seed=seed, distill=False, pool_warmup=pool_warmup
    )
    probs = heads.teacher.predict_proba(proxy.test.bags.reshape(-1, 64))
    labels = proxy.test.labels.reshape(-1)
    return [average_precision(probs[:, c], labels == c) for c in range(probs.shape[1])]


@pytest.mark.slow
def test_pooling_warm_up_rescues_the_class_that_top_k_pooling_leaves_at_chance():
    # Seed 3 of the proxy: with top-k pooling from the first step, the teacher never learns digit 1
    # (it is told apart only as "none of the others"); with the warm-up every class is learned.
    collapsed = _class_aps(0.0, seed=3)
    warmed = _class_aps(TrainOptions().pool_warmup, seed=3)
    print(f"\nper-class AP, top-k from the start {np.round(collapsed, 2)}, with warm-up {np.round(warmed, 2)}")
    assert min(collapsed) < 0.3
    assert min(warmed) > 0.7
    assert np.mean(warmed) > np.mean(collapsed) + 0.05


def test_pool_warmup_is_a_share_of_the_epochs():
    with pytest.raises(ValueError, match="pool_warmup"):
        TrainOptions(pool_warmup=1.5)


def test_bench_training_prints_both_recipes_and_refuses_a_single_seed(capsys):
    assert main(["bench-training", "--seeds", "2", "--epochs", "1"]) == 0
    table = capsys.readouterr().out
    assert "top-k pooling from the start (before)" in table and "pooling warm-up (usam default)" in table
    assert table.count("student ") == 2 and "training time, warm-up against before" in table
    assert main(["bench-training", "--seeds", "1"]) == 2
    assert "--seeds of at least 2" in capsys.readouterr().err
