"""Metrics for heads: instance-level average precision and image-level accuracy."""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of ranking by ``scores`` (n,) against bool ``positives`` (n,): the mean precision at
    each positive's rank (ties broken by order). NaN when there is no positive."""
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = positives[order]
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.mean())


def instance_map(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the AP of class probabilities (n, C) against instance labels (n,)
    (class index, or -1 for background). Classes with no instance are skipped."""
    aps = [average_precision(probs[:, c], labels == c) for c in range(probs.shape[1])]
    present = [ap for ap in aps if not np.isnan(ap)]
    return float(np.mean(present)) if present else float("nan")


def bag_accuracy(bag_probs: np.ndarray, targets: np.ndarray) -> float:
    """Share of single-label bags whose highest class probability is their label.

    Args:
        bag_probs: (N, d, C) point class probabilities per bag.
        targets: (N, C) multi-hot labels; only bags with exactly one label are scored.
    """
    single = targets.sum(axis=1) == 1
    if not single.any():
        return float("nan")
    image_scores = bag_probs[single].max(axis=1)  # N', C: the most confident point per class
    return float((image_scores.argmax(axis=1) == targets[single].argmax(axis=1)).mean())
