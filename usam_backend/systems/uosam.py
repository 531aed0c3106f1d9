"""UO-SAM: refine a coarse semantic label map with SAM's boundaries.

1. **Local region optimizer**, per object of the coarse map (a connected region of one class of at
   least ``min_region_area`` pixels), largest first: prompts derived from the region — a positive
   point at its most interior pixel, a negative point just outside it, the region's box — give SAM's
   best of three masks; a cascade pass refines it (the same points, that mask's box, its low-res
   logits as ``mask_input``). The SAM mask replaces the region only if it agrees with it
   (IoU >= ``accept_iou``); else the coarse region stays. Decided per region.
2. **Global region optimizer** (with a mask generator): automatic masks, largest first (so
   smaller ones are painted last and win), each painted with the majority class of the locally
   refined map beneath it (background may win). If that collapses the map to one class, the
   local result is kept.

Where this deviates from the public script (``uo-sam.py``), and why:

- prompts come from each connected region's own geometry (interior point, outside point, box),
  not from one image-feature similarity map per class: a class's feature mixes all its objects,
  and the most similar pixel of one class may sit in another object;
- acceptance is decided per region with a real pixel IoU; the script compares which rows are
  occupied, and one failed acceptance reverts the whole image to the coarse map;
- every object of every class is refined (the script skips classes under 10 % of the image), with
  one ``set_image`` for the whole map (the script reloads SAM per class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

GENERATOR_OPTIONS: dict[str, Any] = {
    "points_per_side": 64,
    "pred_iou_thresh": 0.86,
    "stability_score_thresh": 0.92,
    "crop_n_layers": 1,
    "crop_n_points_downscale_factor": 2,
    "min_mask_region_area": 100,
}
"""The automatic mask generator's settings for the global step, as UO-SAM's paper and script use them
(the default on CUDA)."""

CPU_GLOBAL_POINTS = 16
CPU_CROP_LAYERS = 0
"""The global step's defaults on CPU: the fewest points per side and crop layers for which the
refinement oracle (``tests/refine_oracle.py``) scores local + global as high as the paper's 64 x 64
points with a crop layer (see the README's *Refining masks*)."""


def generator_options(
    device_type: str, *, points_per_side: int | None = None, crop_layers: int | None = None
) -> dict[str, Any]:
    """The automatic mask generator's settings on ``device_type`` ("cpu" or "cuda"): the paper's
    on CUDA, fewer points and no crops on CPU; ``points_per_side`` and ``crop_layers`` override."""
    options = dict(GENERATOR_OPTIONS)
    if device_type == "cpu":
        options.update(points_per_side=CPU_GLOBAL_POINTS, crop_n_layers=CPU_CROP_LAYERS)
    if points_per_side is not None:
        options["points_per_side"] = points_per_side
    if crop_layers is not None:
        options["crop_n_layers"] = crop_layers
    return options


IGNORE = 255
"""A coarse-map value left alone: neither refined nor painted over (VOC's "void")."""


class Predictor(Protocol):
    """``segment_anything.SamPredictor``'s interface (``EnginePredictor`` provides it too)."""

    def set_image(self, image: np.ndarray, image_format: str = ...) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = ...,
        point_labels: np.ndarray | None = ...,
        box: np.ndarray | None = ...,
        mask_input: np.ndarray | None = ...,
        multimask_output: bool = ...,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class MaskGenerator(Protocol):
    """``segment_anything.SamAutomaticMaskGenerator``'s interface (usam's ``AutomaticMasks`` has it
    too): records with ``segmentation`` (H, W bool) and ``area`` (and ``bbox``, ``predicted_iou``,
    ``stability_score``)."""

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class RefineOptions:
    """The constants of both optimizers.

    Attributes:
        min_region_area: connected regions smaller than this (pixels) are left as they are.
        max_regions: at most this many regions are refined, the largest first (the rest stay).
        accept_iou: the SAM mask replaces a region only with at least this IoU to it (paper: 0.4).
        cascade: run SAM's second pass (mask_input) on the best first-pass mask.
        background: the class of pixels a refined region gives up.
        ignore: a value left alone everywhere (None: none).
        negative_margin: the negative point is searched within the region's box grown by this
            share of its size on every side.
    """

    min_region_area: int = 100
    max_regions: int = 256
    accept_iou: float = 0.4
    cascade: bool = True
    background: int = 0
    ignore: int | None = IGNORE
    negative_margin: float = 0.25


@dataclass
class RefineReport:
    """What the optimizers decided: per region (class, area, IoU with its SAM mask, accepted)."""

    regions: list[dict[str, Any]] = field(default_factory=list)
    global_masks: int = 0
    global_collapsed: bool = False

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.regions if r["accepted"])


def refine_masks(
    image: np.ndarray,
    coarse: np.ndarray,
    predictor: Predictor,
    *,
    generator: MaskGenerator | None = None,
    local: bool = True,
    report: RefineReport | None = None,
    **options: Any,
) -> np.ndarray:
    """Refine a coarse label map with SAM.

    Args:
        image: (H, W, 3) uint8 RGB.
        coarse: (H, W) integer label map; ``background`` (0) is background, ``ignore`` (255) is
            left alone.
        predictor: ``SamPredictor``'s interface; ``set_image`` is called once.
        generator: ``SamAutomaticMaskGenerator``'s interface (e.g. ``AutomaticMasks(engine,
            **generator_options(...))``); None runs the local step only.
        local: run the local step (False with a generator: the global step alone).
        report: filled with the per-region decisions, if given.
        options: :class:`RefineOptions` fields.

    Returns:
        The refined (H, W) label map, with ``coarse``'s dtype.
    """
    opts = RefineOptions(**options)
    _check(image, coarse)
    report = report if report is not None else RefineReport()
    refined = coarse
    if local:
        predictor.set_image(image)
        refined = local_refine(coarse, predictor, opts, report)
    if generator is None:
        return refined.copy() if refined is coarse else refined
    return global_refine(refined, generator.generate(image), opts, report)


def local_refine(coarse: np.ndarray, predictor: Predictor, opts: RefineOptions, report: RefineReport) -> np.ndarray:
    """Step 1 over every region, largest first (a smaller region painted later wins). A region's
    mask is made only when it is refined, over its box; SAM's masks are image-sized."""
    refined = coarse.copy()
    frozen = coarse == opts.ignore if opts.ignore is not None else np.zeros(coarse.shape, dtype=bool)
    ids, components = components_of(coarse, opts)
    for component in components[: opts.max_regions]:
        points, labels, box, region = region_prompts(component, ids, opts)
        mask = _sam_mask(predictor, points, labels, box, coarse.shape, opts)
        iou = _iou_on_box(mask, component, region) if mask is not None else 0.0
        accepted = iou >= opts.accept_iou
        report.regions.append(
            {"class": component.cls, "area": component.area, "iou": round(iou, 4), "accepted": accepted}
        )
        if not accepted or mask is None:
            continue
        x0, y0, x1, y1 = component.box
        inside = refined[y0:y1, x0:x1]
        inside[region & ~mask[y0:y1, x0:x1] & (inside == component.cls)] = opts.background
        refined[mask & ~frozen] = component.cls
    return refined


def global_refine(
    local: np.ndarray, records: Sequence[dict[str, Any]], opts: RefineOptions, report: RefineReport
) -> np.ndarray:
    """Step 2: automatic masks largest first, each painted with the majority class beneath it."""
    result = local.copy()
    frozen = local == opts.ignore if opts.ignore is not None else np.zeros(local.shape, dtype=bool)
    for record in sorted(records, key=lambda r: -int(r.get("area", np.count_nonzero(r["segmentation"])))):
        segment = np.asarray(record["segmentation"], dtype=bool) & ~frozen
        if segment.shape != local.shape or not segment.any():
            continue
        values, counts = np.unique(local[segment], return_counts=True)
        result[segment] = values[int(np.argmax(counts))]
        report.global_masks += 1
    before = _classes(local, opts)
    if len(before) > 1 and len(_classes(result, opts)) <= 1:
        report.global_collapsed = True
        return local
    return result


@dataclass(frozen=True)
class Component:
    """A connected region of one class of the coarse map: its class, its id in the map of
    :func:`components_of`, its area (pixels) and its XYXY box (max exclusive)."""

    cls: int
    id: int
    area: int
    box: tuple[int, int, int, int]


def components_of(coarse: np.ndarray, opts: RefineOptions) -> tuple[np.ndarray, list[Component]]:
    """Every connected region (8-connected) of a non-background class with at least
    ``min_region_area`` pixels, the largest first (ties: by class, then in OpenCV's order), and an
    (H, W) int32 map of their ids (0: none). Regions are kept as statistics: no mask is made here."""
    ids = np.zeros(coarse.shape, dtype=np.int32)
    found: list[Component] = []
    for cls in _classes(coarse, opts):
        if cls == opts.background:
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats((coarse == cls).astype(np.uint8), connectivity=8)
        kept = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= opts.min_region_area) + 1
        if not len(kept):
            continue
        renumber = np.zeros(count, dtype=np.int32)
        renumber[kept] = np.arange(len(found) + 1, len(found) + 1 + len(kept))
        ids += renumber[labels]  # the classes' regions do not overlap
        for index in kept.tolist():
            x, y, w, h, area = (int(v) for v in stats[index])
            found.append(Component(int(cls), int(renumber[index]), area, (x, y, x + w, y + h)))
    found.sort(key=lambda component: -component.area)
    return ids, found


def region_prompts(
    component: Component, ids: np.ndarray, opts: RefineOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prompts for one region: (n, 2) XY points, (n,) labels (1 inside, 0 outside), XYXY box, and
    the region's mask over that box ((y1 - y0, x1 - x0) bool).

    The positive point is the region's most interior pixel (farthest from its edge); the negative
    one the pixel farthest from the region within its box grown by ``negative_margin``. Only that
    grown box of ``ids`` (the map of :func:`components_of`) is read."""
    x0, y0, x1, y1 = component.box
    height, width = ids.shape
    mx, my = int((x1 - x0) * opts.negative_margin) + 1, int((y1 - y0) * opts.negative_margin) + 1
    wx0, wy0, wx1, wy1 = max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
    window = ids[wy0:wy1, wx0:wx1] == component.id
    region = window[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    # outside the box is outside the region, so the padded box gives the full image's distances
    inside = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    py, px = np.unravel_index(int(np.argmax(inside)), inside.shape)
    points, labels = [[x0 + px, y0 + py]], [1]
    if not window.all():
        outside = cv2.distanceTransform((~window).astype(np.uint8), cv2.DIST_L2, 5)
        ny, nx = np.unravel_index(int(np.argmax(outside)), outside.shape)
        points.append([wx0 + nx, wy0 + ny])
        labels.append(0)
    box = np.array([x0, y0, x1, y1], float)
    return np.asarray(points, dtype=np.float32), np.asarray(labels, dtype=np.int64), box, region


def _sam_mask(
    predictor: Predictor,
    points: np.ndarray,
    labels: np.ndarray,
    box: np.ndarray,
    shape: tuple[int, ...],
    opts: RefineOptions,
) -> np.ndarray | None:
    """SAM's best (H, W) mask for a region's prompts, after the cascade pass; None if not (H, W)."""
    masks, scores, low_res = predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=True)
    best = int(np.argmax(scores))
    mask = np.asarray(masks[best], dtype=bool)
    if opts.cascade and mask.any():
        ys, xs = np.nonzero(mask)
        cascade_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
        masks, _, _ = predictor.predict(
            point_coords=points, point_labels=labels, box=cascade_box, mask_input=low_res[best][None],
            multimask_output=False,
        )  # fmt: skip
        mask = np.asarray(masks[0], dtype=bool)
    return mask if mask.shape == shape else None


def _iou_on_box(mask: np.ndarray, component: Component, region: np.ndarray) -> float:
    """IoU of an (H, W) mask with a region given over its box: the intersection is in the box."""
    x0, y0, x1, y1 = component.box
    intersection = np.count_nonzero(mask[y0:y1, x0:x1] & region)
    union = np.count_nonzero(mask) + component.area - intersection
    return intersection / union if union else 0.0


def _classes(labels: np.ndarray, opts: RefineOptions) -> list[int]:
    return [int(v) for v in np.unique(labels) if opts.ignore is None or v != opts.ignore]


def _check(image: np.ndarray, coarse: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if coarse.shape != image.shape[:2]:
        raise ValueError(f"the coarse map is {coarse.shape}, the image {image.shape[:2]}: they must match")
    if not np.issubdtype(coarse.dtype, np.integer):
        raise ValueError(f"the coarse map must hold integer class ids, got {coarse.dtype}")
