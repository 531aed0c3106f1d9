"""Temperature scaling of a head on annotated points, so its probabilities mean what they say.

One scalar ``T`` divides the head's logits; it is chosen to minimise the negative log-likelihood
of the annotators' point labels (background included when the head has a background output).
It changes no ranking, only how sure the head claims to be, which is what the task score and
the score threshold read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.head import Head

TEMPERATURES = np.geomspace(0.25, 8.0, 61)


def calibrate(head: Head, x: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
    """Fit and store ``head.info["calibration"]``; None (head unchanged) without usable points."""
    classes = head.config.num_classes
    keep = (y >= 0) | ((y == -1) & head.config.background)
    if keep.sum() < 10 or len(np.unique(y[keep])) < 2:
        return None
    targets = torch.as_tensor(np.where(y[keep] < 0, classes, y[keep]), dtype=torch.long)
    with torch.inference_mode():
        logits = head.net(torch.as_tensor(x[keep], dtype=torch.float32, device=head.net.mean.device)).cpu()
    nll = [float(F.cross_entropy(logits / t, targets)) for t in TEMPERATURES]
    best = int(np.argmin(nll))
    record = {
        "temperature": float(TEMPERATURES[best]),
        "points": int(keep.sum()),
        "nll_uncalibrated": float(F.cross_entropy(logits, targets)),
        "nll": nll[best],
    }
    head.info["calibration"] = record
    return record
