"""SAM's automatic mask generator, for the refinement's global step."""

from __future__ import annotations

from typing import Any

import numpy as np
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam


class AutomaticMasks:
    """``SamAutomaticMaskGenerator`` that answers ``[]`` for an image where no mask passes its
    thresholds: with crops, segment_anything then indexes an empty tensor while removing
    duplicates between crops and raises IndexError instead of returning no masks."""

    def __init__(self, model: Sam, **options: Any):
        self.generator = SamAutomaticMaskGenerator(model, **options)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        try:
            return list(self.generator.generate(image))
        except IndexError as exc:
            if "size 0" not in str(exc):
                raise
            return []
