"""A real-data proxy of U-SAM's multiple-instance setting: bags of handwritten digits.

A bag stands for an image, its instances for the image's grid points. The instances are real
(non-SAM) features: the 8x8 pixels of scikit-learn's digits (1,797 scans of handwriting, 64
values each, scaled to 0..1). ``classes`` digits are the user's classes; the other digits are
the points on no class (background). A bag holds 1-3 classes, each with 1-3 instances, among
background instances; its target is the multi-hot set of its classes. Heads train on bag
labels alone and are scored by instance-level mAP on bags made of held-out scans.

Needs scikit-learn (the ``dev`` extra), imported when a proxy is built.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.metrics import instance_map
from training.synthetic import SyntheticBags as Bags  # the same bags, of real features (D = 64)
from training.train import train_heads
from usam_backend.core.errors import ConfigurationError


@dataclass(frozen=True)
class DigitProxy:
    """Training bags and test bags built from disjoint halves of the scans."""

    train: Bags
    test: Bags
    digits: tuple[int, ...]  # the digit that each class is

    @property
    def class_names(self) -> list[str]:
        return [f"digit_{d}" for d in self.digits]


@dataclass(frozen=True)
class ProxyRun:
    """One training seed: teacher and student instance mAP on the test bags, training seconds."""

    seed: int
    teacher: float
    student: float
    seconds: float


def load_digits_features() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 64) float32 pixels in 0..1 and (1797,) digit labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigurationError(
            "the training proxy needs scikit-learn: pip install scikit-learn (it is in usam's dev extra)"
        ) from None
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def make_bags(
    x: np.ndarray, y: np.ndarray, digits: Sequence[int], bags: int, points: int, rng: np.random.Generator
) -> Bags:
    """``bags`` bags of ``points`` instances from the scans ``x`` with digit labels ``y``."""
    pools = [np.flatnonzero(y == d) for d in digits]
    background = np.flatnonzero(~np.isin(y, digits))
    classes = len(digits)
    if points < 9:
        raise ValueError("a bag needs at least 9 points: up to 3 classes of up to 3 instances each")
    out, targets, labels = [], [], []
    for _ in range(bags):
        present = rng.choice(classes, size=rng.integers(1, min(3, classes) + 1), replace=False)
        index: list[int] = []
        owner: list[int] = []
        for c in present:
            count = int(rng.integers(1, 4))
            index += rng.choice(pools[c], size=count, replace=False).tolist()
            owner += [int(c)] * count
        rest = points - len(index)
        index += rng.choice(background, size=rest, replace=False).tolist()
        owner += [-1] * rest
        order = rng.permutation(points)  # the position of a point carries no label
        out.append(x[np.asarray(index)[order]])
        labels.append(np.asarray(owner)[order])
        targets.append(np.eye(classes, dtype=np.float32)[present].sum(axis=0))
    return Bags(np.stack(out).astype(np.float32), np.stack(targets), np.stack(labels))


def digit_proxy(
    *, data_seed: int = 0, classes: int = 5, points: int = 16, train_bags: int = 200, test_bags: int = 200
) -> DigitProxy:
    """The proxy's data: digits ``data_seed .. data_seed + classes - 1`` (mod 10) are the classes;
    the scans are split in halves, one for training bags, one for test bags."""
    if not 1 <= classes <= 9:
        raise ValueError("classes must be 1..9: the other digits are the background")
    x, y = load_digits_features()
    rng = np.random.default_rng(data_seed)
    split = rng.permutation(len(x))
    train, test = split[: len(x) // 2], split[len(x) // 2 :]
    digits = tuple((data_seed + i) % 10 for i in range(classes))
    return DigitProxy(
        train=make_bags(x[train], y[train], digits, train_bags, points, rng),
        test=make_bags(x[test], y[test], digits, test_bags, points, rng),
        digits=digits,
    )


def run_proxy(seeds: Sequence[int], proxy: DigitProxy | None = None, **options: Any) -> list[ProxyRun]:
    """Train teacher and student (:func:`training.train.train_heads` with ``options``) once per
    seed on the proxy's training bags; score both on its test bags."""
    proxy = proxy or digit_proxy()
    flat = proxy.test.bags.reshape(-1, proxy.test.bags.shape[-1])
    labels = proxy.test.labels.reshape(-1)
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        heads = train_heads(proxy.train.bags, proxy.train.targets, proxy.class_names, seed=seed, **options)
        seconds = time.perf_counter() - started
        teacher = instance_map(heads.teacher.predict_proba(flat), labels)
        student = instance_map(heads.final.predict_proba(flat), labels)
        runs.append(ProxyRun(seed, teacher, student, seconds))
    return runs
