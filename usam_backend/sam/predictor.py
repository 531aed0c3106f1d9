"""``SamPredictor``'s interface over usam's engine, so algorithms written against SAM's own API
(refinement, video) run on cached image embeddings and the batched prompt API."""

from __future__ import annotations

import numpy as np

from usam_backend.sam.cache import ImageEmbedding
from usam_backend.sam.engine import SamEngine


class EnginePredictor:
    """Drop-in for ``segment_anything.SamPredictor``: ``set_image`` then ``predict``.

    ``set_image`` reuses the engine's embedding cache, so setting an image seen before costs no
    encoder pass. Outputs match ``SamPredictor.predict`` in shape, dtype and value.
    """

    def __init__(self, engine: SamEngine):
        self.engine = engine
        self.embedding: ImageEmbedding | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an HxWx3 uint8 image (or take its cached embedding)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR":
            image = image[..., ::-1]
        self.embedding = self.engine.embed(np.ascontiguousarray(image))

    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt, as ``SamPredictor.predict``.

        Args:
            point_coords: (N, 2) XY pixels; point_labels: (N,) 1 positive, 0 negative.
            box: (4,) XYXY pixels. mask_input: (1, 256, 256) low-res logits from an earlier call.

        Returns:
            masks (K, H, W) bool (float logits with ``return_logits``), scores (K,) float32,
            low-res logits (K, 256, 256) float32.
        """
        if self.embedding is None:
            raise RuntimeError("call set_image before predict")
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        batch = self.engine.predict_prompts(
            self.embedding,
            points=None if point_coords is None else np.asarray(point_coords, dtype=np.float32)[None],
            labels=None if point_labels is None else np.asarray(point_labels)[None],
            boxes=None if box is None else np.asarray(box, dtype=np.float32).reshape(1, 4),
            mask_input=None if mask_input is None else np.asarray(mask_input, dtype=np.float32)[None],
            multimask=multimask_output,
            masks=not return_logits,
        )
        low_res = batch.low_res_logits[0]
        if return_logits:
            full = self.engine.upscale_logits(low_res, self.embedding).cpu().numpy()
        else:
            assert batch.masks is not None
            full = batch.masks[0]
        return full, batch.iou_predictions[0], low_res.float().cpu().numpy()

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One mask per box, all in one decoder batch (what ``predict(box=..., multimask_output=False)``
        gives for each box).

        Args:
            boxes: (B, 4) XYXY pixels.

        Returns:
            masks (B, H, W) bool and scores (B,) float32.
        """
        if self.embedding is None:
            raise RuntimeError("call set_image before predict_boxes")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        batch = self.engine.predict_prompts(self.embedding, boxes=boxes, multimask=False)
        assert batch.masks is not None
        return batch.masks[:, 0], batch.iou_predictions[:, 0]

    def reset_image(self) -> None:
        self.embedding = None
