"""usam's automatic mask generator (SAM's "segment everything"), for the refinement's global step.

It keeps ``segment_anything.SamAutomaticMaskGenerator``'s candidates — the same point grids,
crops, thresholds and non-maximum suppression — but works where they are cheap:

* points are decoded in batches with usam's decoder (image-side work shared by the batch), and
  the full-image layer reuses the image's cached embedding (the local step already made it);
* predicted IoU and stability are scored on SAM's 256x256 low-resolution logits, and duplicates
  are removed on boxes of the low-resolution masks, so a candidate is never brought to image
  size before it is kept;
* only the survivors are upscaled, one at a time.

The stock generator upscales every candidate of every point (3 per point) to the crop's size
first. Its outputs are matched within IoU 0.99 (``tests/test_generator.py``).

The generator talks to SAM through :class:`PointPrompts` (``set_crop`` then ``point_masks``), so
the refinement tests can drive it with a geometric oracle as they drive the local step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import (
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from usam_backend.core.masks import mask_boxes
from usam_backend.sam.cache import ImageEmbedding
from usam_backend.sam.decoder import PointDecoder
from usam_backend.sam.engine import SamEngine

ENCODER_SIDE = 1024
"""SAM's encoder input side: low-res logits cover the image resized to this long side, padded to a
square at bottom-right, at a quarter of its resolution."""


@dataclass(frozen=True)
class GeneratorOptions:
    """``SamAutomaticMaskGenerator``'s settings, same names and defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    mask_threshold: float = 0.0

    @classmethod
    def of(cls, options: dict[str, Any]) -> GeneratorOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown automatic-mask options {unknown}; known: {sorted(known)}")
        made = cls(**options)
        if made.points_per_side < 1 or made.crop_n_layers < 0 or made.points_per_batch < 1:
            raise ValueError(
                f"points_per_side and points_per_batch must be positive and crop_n_layers at least 0, got {options}"
            )
        return made


class PointPrompts(Protocol):
    """SAM answering single positive points on a crop of an image (``SamPredictor``'s
    ``set_image`` and ``predict_torch`` with ``multimask_output=True``, without upscaling)."""

    def set_crop(self, image: np.ndarray, crop_box: list[int]) -> None:
        """``image`` (H, W, 3) uint8 RGB; ``crop_box`` XYXY pixels of it to answer on."""

    def point_masks(self, points: np.ndarray, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's three masks for (B, 2) XY points in crop pixels, for the points with a predicted IoU
        over ``iou_threshold`` (the others' masks are never made): (k,) indices of those points,
        (k, 3, 256, 256) low-res logits over the crop (SAM's layout) and (k, 3) predicted IoU."""
        ...


class EnginePrompts:
    """:class:`PointPrompts` on usam's engine: cached embeddings, the shared-work decoder."""

    def __init__(self, engine: SamEngine):
        self.engine = engine
        self.embedding: ImageEmbedding | None = None
        self.decoder: PointDecoder | None = None

    def set_crop(self, image: np.ndarray, crop_box: list[int]) -> None:
        x0, y0, x1, y1 = crop_box
        self.embedding = self.engine.embed(np.ascontiguousarray(image[y0:y1, x0:x1]))
        self.decoder = self.engine.point_decoder(self.embedding)

    def point_masks(self, points: np.ndarray, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.embedding is not None and self.decoder is not None, "set_crop first"
        return self.engine.point_masks(self.embedding, points, iou_threshold, self.decoder)


@dataclass
class _Candidates:
    """Kept candidates of one crop: low-res logits and what is known of them."""

    logits: torch.Tensor  # (n, 256, 256)
    iou: torch.Tensor  # (n,)
    stability: torch.Tensor  # (n,)
    boxes: torch.Tensor  # (n, 4) XYXY in the full image (inclusive max, as segment_anything's)
    points: torch.Tensor  # (n, 2) XY in the full image
    crop_box: list[int]
    input_size: tuple[int, int]

    def take(self, keep: torch.Tensor) -> _Candidates:
        return _Candidates(
            self.logits[keep], self.iou[keep], self.stability[keep], self.boxes[keep], self.points[keep],
            self.crop_box, self.input_size,
        )  # fmt: skip


class AutomaticMasks:
    """Automatic masks of an image, records as ``SamAutomaticMaskGenerator.generate``'s
    (``output_mode="binary_mask"``): ``segmentation`` (H, W) bool, ``area``, ``bbox`` XYWH,
    ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box`` XYWH.

    Args:
        source: usam's engine, or any :class:`PointPrompts`.
        options: :class:`GeneratorOptions` fields.
    """

    def __init__(self, source: SamEngine | PointPrompts, **options: Any):
        self.prompts: PointPrompts = EnginePrompts(source) if isinstance(source, SamEngine) else source
        self.options = GeneratorOptions.of(options)
        o = self.options
        self.grids = build_all_layer_point_grids(o.points_per_side, o.crop_n_layers, o.crop_n_points_downscale_factor)

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        o = self.options
        height, width = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((height, width), o.crop_n_layers, o.crop_overlap_ratio)
        crops = [self._crop(image, box, layer) for box, layer in zip(crop_boxes, layers, strict=True)]
        masks, records = [], []
        # duplicates between crops: boxes, the smaller crop preferred (as segment_anything)
        flat = [(c, i) for c in crops for i in range(len(c.iou))]
        if len(crops) > 1 and flat:
            boxes = torch.cat([c.boxes for c in crops]).float()
            areas = torch.tensor([float(_area(c.crop_box)) for c, _ in flat])
            keep = batched_nms(boxes, 1 / areas, torch.zeros(len(flat)), o.crop_nms_thresh)
            flat = [flat[i] for i in keep.tolist()]
        for crop, i in flat:
            mask = self._upscale(crop, i, (height, width))
            masks.append(mask)
            records.append(
                {
                    "area": 0,
                    "bbox": box_xyxy_to_xywh(crop.boxes[i]).tolist(),
                    "predicted_iou": float(crop.iou[i]),
                    "point_coords": [crop.points[i].tolist()],
                    "stability_score": float(crop.stability[i]),
                    "crop_box": box_xyxy_to_xywh(torch.as_tensor(crop.crop_box)).tolist(),
                }
            )
        if o.min_mask_region_area > 0 and masks:
            masks, records = self._small_regions(masks, records)
        for mask, record in zip(masks, records, strict=True):
            record["segmentation"] = mask
            record["area"] = int(np.count_nonzero(mask))
        return records

    def _crop(self, image: np.ndarray, crop_box: list[int], layer: int) -> _Candidates:
        """Candidates of one crop that pass the thresholds, the crop's edge and its box NMS."""
        o = self.options
        height, width = image.shape[:2]
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        input_size = ResizeLongestSide.get_preprocess_shape(crop_size[0], crop_size[1], ENCODER_SIDE)
        self.prompts.set_crop(image, crop_box)
        points_all = self.grids[layer] * np.array(crop_size)[None, ::-1]
        parts: list[_Candidates] = []
        for start in range(0, len(points_all), o.points_per_batch):
            points = points_all[start : start + o.points_per_batch]
            rows, logits, iou = self.prompts.point_masks(points, o.pred_iou_thresh)
            k = logits.shape[1]
            logits, iou = logits.flatten(0, 1).float(), iou.flatten().float().to(logits.device)
            xy = torch.as_tensor(points[rows.cpu().numpy()], dtype=torch.float64).repeat_interleave(k, dim=0)
            keep = iou > o.pred_iou_thresh if o.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
            logits, iou, xy = logits[keep], iou[keep], xy[keep.cpu()]
            valid = _valid_low_res(logits, input_size)
            stability = calculate_stability_score(valid, o.mask_threshold, o.stability_score_offset)
            keep = stability >= o.stability_score_thresh if o.stability_score_thresh > 0 else ~torch.isnan(stability)
            logits, iou, xy, stability, valid = logits[keep], iou[keep], xy[keep.cpu()], stability[keep], valid[keep]
            boxes = _crop_boxes(valid > o.mask_threshold, input_size, crop_size)
            keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
            parts.append(
                _Candidates(logits[keep], iou[keep], stability[keep], boxes[keep], xy[keep.cpu()], crop_box, input_size)
            )
        found = _Candidates(
            torch.cat([p.logits for p in parts]), torch.cat([p.iou for p in parts]),
            torch.cat([p.stability for p in parts]), torch.cat([p.boxes for p in parts]),
            torch.cat([p.points for p in parts]), crop_box, input_size,
        )  # fmt: skip
        keep = batched_nms(found.boxes.float(), found.iou.cpu(), torch.zeros(len(found.iou)), o.box_nms_thresh)
        found = found.take(keep)
        found.boxes = uncrop_boxes_xyxy(found.boxes, crop_box)
        found.points = found.points + torch.tensor([x0, y0], dtype=torch.float64)
        return found

    def _upscale(self, crop: _Candidates, index: int, size: tuple[int, int]) -> np.ndarray:
        """Candidate ``index`` of ``crop`` as an (H, W) bool mask of the full image."""
        x0, y0, x1, y1 = crop.crop_box
        logits = crop.logits[index][None, None]
        square = F.interpolate(logits, (ENCODER_SIDE, ENCODER_SIDE), mode="bilinear", align_corners=False)
        h_in, w_in = crop.input_size
        full = F.interpolate(square[..., :h_in, :w_in], (y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        mask = np.zeros(size, dtype=bool)
        mask[y0:y1, x0:x1] = (full[0, 0] > self.options.mask_threshold).cpu().numpy()
        return mask

    def _small_regions(
        self, masks: list[np.ndarray], records: list[dict[str, Any]]
    ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """Small islands and holes removed (segment_anything's post-processing), then box NMS again,
        masks that needed no change preferred."""
        area = self.options.min_mask_region_area
        scores = []
        for i, mask in enumerate(masks):
            mask, holes = remove_small_regions(mask, area, mode="holes")
            mask, islands = remove_small_regions(mask, area, mode="islands")
            masks[i] = mask
            scores.append(0.0 if holes or islands else 1.0)
        boxes = torch.as_tensor(np.stack([_inclusive_box(m) for m in masks]), dtype=torch.float32)
        nms = max(self.options.box_nms_thresh, self.options.crop_nms_thresh)
        keep = batched_nms(boxes, torch.tensor(scores), torch.zeros(len(masks)), nms).tolist()
        for i in keep:
            if scores[i] == 0.0:
                records[i]["bbox"] = box_xyxy_to_xywh(boxes[i]).tolist()
        return [masks[i] for i in keep], [records[i] for i in keep]


def _valid_low_res(logits: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """The part of (n, 256, 256) low-res logits over the image, without the square's padding."""
    side = logits.shape[-1]
    h = -(-input_size[0] * side // ENCODER_SIDE)
    w = -(-input_size[1] * side // ENCODER_SIDE)
    return logits[:, :h, :w]


def _crop_boxes(masks: torch.Tensor, input_size: tuple[int, int], crop_size: tuple[int, int]) -> torch.Tensor:
    """XYXY boxes (inclusive max) in crop pixels of (n, h, w) low-res masks: each low-res pixel
    covers ``ENCODER_SIDE / 256`` encoder pixels, scaled back to the crop."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4))
    cell = ENCODER_SIDE / 256
    scale_y, scale_x = crop_size[0] / input_size[0], crop_size[1] / input_size[1]
    boxes = torch.as_tensor(mask_boxes(masks.cpu().numpy()), dtype=torch.float32)  # x0, y0, x1, y1 exclusive
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    out = torch.stack(
        [
            boxes[:, 0] * cell * scale_x,
            boxes[:, 1] * cell * scale_y,
            (boxes[:, 2] * cell * scale_x - 1).clamp(max=crop_size[1] - 1),
            (boxes[:, 3] * cell * scale_y - 1).clamp(max=crop_size[0] - 1),
        ],
        dim=1,
    ).round()
    out[empty] = 0
    return out


def _area(box: list[int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _inclusive_box(mask: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = mask_boxes(mask[None])[0]
    return np.array([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], dtype=np.float32)
