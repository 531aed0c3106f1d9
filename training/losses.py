"""Multiple-instance learning and uncertainty-distillation losses (U-SAM, Sec. 3).

Shapes: ``logits`` (B, d, K) are per-point head outputs for B images of d grid points and K
outputs; ``targets`` (B, K) are non-negative bag labels (multi-hot before normalisation).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def top_k(points: int, a: float) -> int:
    """How many points pool into a class score: ``k = max(1, ceil(d / a))``."""
    return max(1, math.ceil(points / a))


def pooled_k(points: int, k: int, epoch: int, warmup_epochs: float) -> int:
    """How many points pool into a class score at ``epoch`` (from 0) of a pooling warm-up: all
    ``points`` at the start (the mean), narrowing linearly to ``k`` at ``warmup_epochs``, and ``k``
    from then on. The mean teaches every point of a labelled image from the first step, so each
    class's own points rise before the pooling narrows to the few highest."""
    if epoch >= warmup_epochs:
        return k
    return max(k, round(points - (points - k) * epoch / warmup_epochs))


def mil_scores(logits: Tensor, k: int) -> Tensor:
    """Class scores per image: the mean of each column's k largest point logits, (B, K)."""
    return logits.topk(min(k, logits.shape[1]), dim=1).values.mean(dim=1)


def mil_loss(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Cross-entropy between softmax(class scores) and the label vector normalised to sum 1."""
    target_pmf = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-12)
    log_p = F.log_softmax(mil_scores(logits, k), dim=1)
    return -(target_pmf * log_p).sum(dim=1).mean()


def bad_points(teacher_logits: Tensor, targets: Tensor, tau: float) -> Tensor:
    """Points the teacher got wrong or is unsure of, (B, d) bool.

    A point is bad when its teacher entropy exceeds ``tau * log K`` (``tau`` is relative to the
    maximum entropy, so one value fits any number of classes), or when the teacher is sure of a
    class that is not among the image's labels.
    """
    probs = teacher_logits.softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    unsure = entropy > tau * math.log(teacher_logits.shape[-1])
    predicted = probs.argmax(dim=-1)  # B, d
    wrong = targets.gather(1, predicted) <= 0
    return unsure | wrong


def uncertainty_loss(student_logits: Tensor, bad: Tensor) -> Tensor:
    """Teach bad points to be uncertain: cross-entropy of their student distribution against the
    uniform one, averaged over each image's bad points, then over images (images without bad
    points contribute zero). Its minimum, log K, is reached at the uniform distribution.
    """
    uniform_ce = -F.log_softmax(student_logits, dim=-1).mean(dim=-1)  # B, d
    per_image = (uniform_ce * bad).sum(dim=1) / bad.sum(dim=1).clamp_min(1)
    return per_image.mean()
