"""``usam refine`` over folders, and ``usam eval masks``: label-map PNGs in, label-map PNGs out.

Images and coarse label maps are matched by file stem. A refined map is written in the coarse
map's own format (a palette PNG keeps its palette, 8- and 16-bit grey stay grey), atomically;
maps already written are skipped, so a stopped run resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from usam_backend.core.errors import DataError, ImageError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.images import IMAGE_EXTENSIONS, load_image
from usam_backend.systems.uosam import IGNORE, MaskGenerator, Predictor, RefineReport, refine_masks
from usam_backend.tools.evaluate import Confusion
from usam_backend.tools.viz import class_colors


@dataclass
class LabelMap:
    """A label map as read from a PNG, with what it takes to write one back the same way."""

    values: np.ndarray  # (H, W) integer
    mode: str  # PIL mode: "P", "L", "I;16", "I"
    palette: list[int] | None

    @classmethod
    def read(cls, path: Path) -> LabelMap:
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode not in ("P", "L", "I;16", "I"):
                    raise DataError(f"{path} is a {image.mode} image, not a label map (palette or grey PNG)")
                palette = image.getpalette() if image.mode == "P" else None
                values = np.array(image)
                return cls(values, image.mode, palette)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot read the label map {path}: {exc}") from None

    def like(self, values: np.ndarray) -> Image.Image:
        """``values`` as an image of this map's mode (and palette)."""
        dtype = {"P": np.uint8, "L": np.uint8, "I;16": np.uint16, "I": np.int32}[self.mode]
        image = Image.fromarray(values.astype(dtype))
        if self.mode == "P":
            image.putpalette(self.palette or [0] * 768)  # an L image with a palette is a P image, indices kept
        return image


@dataclass
class RefineRun:
    refined: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    accepted_regions: int = 0
    regions: int = 0


def pairs(data: Path, masks: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(image, coarse map) pairs by stem, and what could not be paired."""
    for folder in (data, masks):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder")
    images = {p.stem: p for p in sorted(data.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    maps = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() == ".png"}
    matched = [(images[stem], maps[stem]) for stem in sorted(images.keys() & maps.keys())]
    problems = [(str(images[s]), "no coarse map with this stem") for s in sorted(images.keys() - maps.keys())]
    problems += [(str(maps[s]), "no image with this stem") for s in sorted(maps.keys() - images.keys())]
    return matched, problems


def refine_folder(
    data: Path, masks: Path, outdir: Path, predictor: Predictor, *, generator: MaskGenerator | None = None,
    max_pixels: int = 50_000_000, viz: bool = False, overwrite: bool = False, progress: bool = True,
    **options: Any,
) -> RefineRun:  # fmt: skip
    """Refine every paired coarse map into ``outdir/<stem>.png`` (see the module docs)."""
    matched, problems = pairs(data, masks)
    run = RefineRun(problems=problems)
    if not matched:
        raise DataError(f"no image in {data} has a coarse map of the same stem in {masks}")
    outdir.mkdir(parents=True, exist_ok=True)
    for image_path, map_path in tqdm(matched, desc="refining", unit="image", disable=not progress):
        out = outdir / f"{map_path.stem}.png"
        if out.exists() and not overwrite:
            run.already_done.append(out.name)
            continue
        try:
            image = load_image(image_path, max_pixels=max_pixels)
            coarse = LabelMap.read(map_path)
            if coarse.values.shape != image.shape[:2]:
                raise DataError(f"the map is {coarse.values.shape[::-1]} (W, H), the image {image.shape[1::-1]}")
        except (ImageError, DataError) as exc:
            run.problems.append((str(map_path), str(exc)))
            continue
        report = RefineReport()
        refined = refine_masks(image, coarse.values, predictor, generator=generator, report=report, **options)
        with atomic_path(out) as tmp:
            coarse.like(refined).save(tmp, format="PNG")
        if viz:
            with atomic_path(outdir / "viz" / f"{map_path.stem}.png") as tmp:
                side_by_side(image, coarse.values, refined).save(tmp, format="PNG")
        run.refined.append(out.name)
        run.regions += len(report.regions)
        run.accepted_regions += report.accepted
    return run


def side_by_side(image: np.ndarray, coarse: np.ndarray, refined: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """image | coarse over the image | refined over the image, one colour per class."""
    colors = np.vstack([[0, 0, 0], class_colors(max(int(coarse.max()), int(refined.max()), 1))])

    def over(labels: np.ndarray) -> np.ndarray:
        shown = image.astype(np.float32).copy()
        paint = (labels > 0) & (labels != IGNORE)
        shown[paint] = (1 - alpha) * shown[paint] + alpha * colors[np.minimum(labels[paint], len(colors) - 1)]
        return shown.astype(np.uint8)

    gap = np.full((image.shape[0], 8, 3), 255, dtype=np.uint8)
    return Image.fromarray(np.hstack([image, gap, over(coarse), gap, over(refined)]))


def evaluate_folders(
    pred: Path, gt: Path, *, baseline: Path | None = None, ignore: int | None = IGNORE
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``pred`` (and ``baseline``) against ``gt``, over
    every ground-truth map with a prediction of the same stem."""
    truth = {p.stem: p for p in sorted(gt.glob("*.png"))}
    if not truth:
        raise DataError(f"no ground-truth PNG in {gt}")
    result: dict[str, Any] = {}
    for name, folder in (("pred", pred), ("baseline", baseline)):
        if folder is None:
            continue
        confusion = Confusion(ignore)
        found = {p.stem: p for p in sorted(folder.glob("*.png"))}
        missing = sorted(truth.keys() - found.keys())
        for stem in sorted(truth.keys() & found.keys()):
            confusion.add(LabelMap.read(found[stem]).values, LabelMap.read(truth[stem]).values)
        result[name] = {**confusion.metrics(), "images": len(truth) - len(missing), "missing": missing}
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    pred, baseline = result["pred"], result.get("baseline")
    header = "class      IoU" + ("   baseline   change" if baseline else "")
    lines = [header]
    for cls in sorted(pred["iou"]):
        line = f"{cls:<7}{pred['iou'][cls]:>7.3f}"
        if baseline:
            base = baseline["iou"].get(cls, 0.0)
            line += f"{base:>11.3f}{pred['iou'][cls] - base:>+9.3f}"
        lines.append(line)
    summary = f"mIoU {pred['miou']:.4f}, pixel accuracy {pred['pixel_accuracy']:.4f} over {pred['images']} image(s)"
    if baseline:
        summary += f" (baseline mIoU {baseline['miou']:.4f}, change {pred['miou'] - baseline['miou']:+.4f})"
    lines.append(summary)
    if pred["missing"]:
        missing = ", ".join(pred["missing"][:5])
        lines.append(f"{len(pred['missing'])} ground-truth map(s) without a prediction: {missing}")
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, default=str)
