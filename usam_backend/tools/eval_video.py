"""Video object segmentation scores, DAVIS-2017's unsupervised protocol.

Per sequence, the predicted objects are the proposals 1 to the largest id in any frame, as the
official ``davis2017-evaluation`` reads them: an id no frame uses is an empty proposal, and empty
proposals are added until there are as many as ground-truth objects. Every proposal is scored
against every ground-truth object on every frame: **J**, the region IoU, and **F**, the boundary
F-measure (boundaries match within ``ceil(0.008 x image diagonal)`` pixels, by dilating each with
a disk); two empty masks score 1 on both. Proposals are assigned to ground-truth objects by the
Hungarian algorithm on their mean (J + F) / 2, so an object absent from some frames may be best
matched by an empty proposal. Per object: Mean, Recall (share of frames above 0.5) and Decay
(first quarter's mean minus the last's, DAVIS's overlapping bins). J&F-Mean is (J-Mean + F-Mean)
/ 2 over all objects of all sequences. Pixels of value 255 in the ground truth are void (left
out), as in DAVIS.

Deviations from the official code, all for inputs it refuses or ignores:

- the true objects are the ids present in any ground-truth frame (DAVIS: 1 to the largest id of
  the first frame);
- with ids past :data:`MAX_PROPOSALS` (20), the 20 proposals with the most pixels in the sequence
  are scored (ties: the lower id, so empty ones go first), each under its own id and in id order,
  and the non-empty ones left out are counted (DAVIS stops with an error);
- in :func:`evaluate_folders`, a frame the prediction lacks is an empty one (DAVIS stops).

Masks are indexed PNGs (``<sequence>/<frame>.png``, the value a pixel's object id, 0 background),
which is what ``usam video`` writes and what DAVIS's ``Annotations`` hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from usam_backend.core.errors import DataError

MAX_PROPOSALS = 20
BOUND_TH = 0.008
VOID = 255


def region_j(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """IoU of two masks, void pixels left out; 1 when both are empty."""
    keep = ~void if void is not None else np.ones(gt.shape, dtype=bool)
    gt, pred = gt & keep, pred & keep
    union = np.count_nonzero(gt | pred)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: mask pixels whose right, lower or lower-right neighbour differs."""
    m = mask.astype(bool)
    e = np.zeros_like(m)
    s = np.zeros_like(m)
    se = np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = m ^ e | m ^ s | m ^ se
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """The pixels within ``radius`` of the centre (``skimage.morphology.disk``, which DAVIS uses)."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def boundary_f(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUND_TH) -> float:
    """DAVIS's boundary F-measure between two masks."""
    if void is not None:
        gt, pred = gt & ~void, pred & ~void
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pb, gb = boundary(pred), boundary(gt)
    p_dil = cv2.dilate(pb.astype(np.uint8), disk(radius)).astype(bool)
    g_dil = cv2.dilate(gb.astype(np.uint8), disk(radius)).astype(bool)
    n_p, n_g = np.count_nonzero(pb), np.count_nonzero(gb)
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0  # precision 1 and recall 0, or the other way round
    precision = np.count_nonzero(pb & g_dil) / n_p
    recall = np.count_nonzero(gb & p_dil) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def object_stats(per_frame: np.ndarray) -> dict[str, float]:
    """Mean, Recall (> 0.5) and Decay over one object's frames, as DAVIS's ``db_statistics``: Decay
    is the first of four overlapping bins' mean minus the last's."""
    ids = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(int)
    bins = [per_frame[ids[i] : ids[i + 1] + 1] for i in range(4)]
    return {
        "mean": float(np.mean(per_frame)),
        "recall": float(np.mean(per_frame > 0.5)),
        "decay": float(np.mean(bins[0]) - np.mean(bins[3])),
    }


@dataclass
class SequenceScore:
    name: str
    objects: list[dict[str, Any]]  # per ground-truth object: id, matched proposal (None: padding), J and F stats
    dropped: int = 0  # non-empty predicted objects left out, with ids past MAX_PROPOSALS

    @property
    def j_mean(self) -> float:
        return float(np.mean([o["J"]["mean"] for o in self.objects])) if self.objects else 0.0

    @property
    def f_mean(self) -> float:
        return float(np.mean([o["F"]["mean"] for o in self.objects])) if self.objects else 0.0


def proposals(pred: np.ndarray, n_objects: int) -> tuple[list[int | None], int]:
    """The proposals DAVIS scores in a (T, H, W) map of predicted ids: ids 1 to the largest, an
    unused one empty; past :data:`MAX_PROPOSALS`, the largest by pixel count (ties: the lower id),
    in id order. Padded with None (an empty proposal without an id) to ``n_objects``. Returns them
    and the number of non-empty ids left out."""
    ids, areas = np.unique(pred[pred > 0], return_counts=True)
    largest = int(ids[-1]) if len(ids) else 0
    if largest <= MAX_PROPOSALS:
        kept = list(range(1, largest + 1))
    else:
        order = np.argsort(-areas, kind="stable")
        kept = [int(ids[i]) for i in order[:MAX_PROPOSALS]]
        used = set(kept)
        unused = (k for k in range(1, largest + 1) if k not in used)
        kept = sorted(kept + [next(unused) for _ in range(MAX_PROPOSALS - len(kept))])
    dropped = max(0, len(ids) - MAX_PROPOSALS)
    padding: list[int | None] = [None] * max(0, n_objects - len(kept))
    return [*kept, *padding], dropped


def pair_scores(truth: np.ndarray, proposal: np.ndarray, void: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame J and F, each (T,), of a true object and a proposal: (T, H, W) bool masks."""
    frames = range(len(truth))
    return (
        np.array([region_j(truth[t], proposal[t], void[t]) for t in frames]),
        np.array([boundary_f(truth[t], proposal[t], void[t]) for t in frames]),
    )


def evaluate_sequence(gt: np.ndarray, pred: np.ndarray, name: str = "") -> SequenceScore:
    """Score one sequence: ``gt`` and ``pred`` are (T, H, W) integer maps of object ids."""
    if gt.shape != pred.shape:
        raise DataError(f"{name or 'sequence'}: prediction {pred.shape} and ground truth {gt.shape} differ (T, H, W)")
    void = gt == VOID
    gt_ids = [int(i) for i in np.unique(gt) if i not in (0, VOID)]
    scored, dropped = proposals(pred, len(gt_ids))
    j = np.zeros((len(scored), len(gt_ids), gt.shape[0]))
    f = np.zeros_like(j)
    empty = np.zeros_like(void)
    for gi, g in enumerate(gt_ids):
        truth = gt == g
        versus_empty: tuple[np.ndarray, np.ndarray] | None = None  # every empty proposal scores the same
        for pi, p in enumerate(scored):
            mask = pred == p if p is not None else empty
            if mask.any():
                j[pi, gi], f[pi, gi] = pair_scores(truth, mask, void)
                continue
            if versus_empty is None:
                versus_empty = pair_scores(truth, empty, void)
            j[pi, gi], f[pi, gi] = versus_empty
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-(j.mean(axis=2) + f.mean(axis=2)) / 2)
    match = {int(c): int(r) for r, c in zip(rows, cols, strict=True)}
    objects = [
        {
            "id": g,
            "prediction": scored[match[gi]],
            "J": object_stats(j[match[gi], gi]),
            "F": object_stats(f[match[gi], gi]),
        }
        for gi, g in enumerate(gt_ids)
    ]
    return SequenceScore(name, objects, dropped)


@dataclass
class VideoReport:
    sequences: list[SequenceScore] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        objects = [o for s in self.sequences for o in s.objects]
        if not objects:
            return {}
        out = {
            f"{m}-{k.capitalize()}": float(np.mean([o[m][k] for o in objects]))
            for m in ("J", "F")
            for k in ("mean", "recall", "decay")
        }
        return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}

    def table(self) -> str:
        lines = [f"{'sequence':<24} {'objects':>7} {'J&F':>6} {'J':>6} {'F':>6}"]
        for s in self.sequences:
            jf = (s.j_mean + s.f_mean) / 2
            note = f"  ({s.dropped} predicted objects beyond {MAX_PROPOSALS} left out)" if s.dropped else ""
            lines.append(f"{s.name:<24} {len(s.objects):>7} {jf:>6.3f} {s.j_mean:>6.3f} {s.f_mean:>6.3f}{note}")
        summary = self.summary()
        if summary:
            lines.append(
                f"{'mean (over objects)':<24} {sum(len(s.objects) for s in self.sequences):>7} "
                f"{summary['J&F-Mean']:>6.3f} {summary['J-Mean']:>6.3f} {summary['F-Mean']:>6.3f}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": "DAVIS-2017 unsupervised (Hungarian matching on (J+F)/2, at most 20 predicted objects)",
            "summary": self.summary(),
            "sequences": [
                {"name": s.name, "J&F": (s.j_mean + s.f_mean) / 2, "J": s.j_mean, "F": s.f_mean, "dropped": s.dropped,
                 "objects": s.objects}
                for s in self.sequences
            ],
        }  # fmt: skip


def read_masks(folder: Path) -> tuple[list[str], np.ndarray]:
    """Frame names and the (T, H, W) maps of a folder of indexed PNGs."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"{folder} holds no .png masks")
    maps = []
    for p in files:
        try:
            with Image.open(p) as image:
                if image.mode not in ("P", "L", "I", "I;16"):
                    raise DataError(f"{p} is a {image.mode} image; masks are indexed (P) or grey PNGs of object ids")
                maps.append(np.asarray(image).astype(np.int32))
        except OSError as exc:
            raise DataError(f"{p} is not a readable PNG: {exc}") from None
    if len({m.shape for m in maps}) > 1:
        raise DataError(f"the masks in {folder} do not all have the same size")
    return [p.stem for p in files], np.stack(maps)


def sequences_in(folder: Path) -> dict[str, Path]:
    """A folder of PNGs is one sequence; else each subfolder holding PNGs is one."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    if any(p.suffix.lower() == ".png" for p in folder.iterdir()):
        return {folder.name: folder}
    found = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and any(p.glob("*.png"))}
    if not found:
        raise DataError(f"{folder} holds no .png masks, nor subfolders of them")
    return found


def evaluate_folders(pred_dir: Path, gt_dir: Path) -> VideoReport:
    """Score every ground-truth sequence; a frame the prediction lacks counts as empty."""
    gts = sequences_in(gt_dir)
    preds = sequences_in(pred_dir)
    if len(gts) == 1 and len(preds) == 1:
        preds = {next(iter(gts)): next(iter(preds.values()))}
    report = VideoReport()
    for name, folder in gts.items():
        names, gt = read_masks(folder)
        pred = np.zeros_like(gt)
        if name in preds:
            pred_names, maps = read_masks(preds[name])
            position = {n: i for i, n in enumerate(pred_names)}
            for t, frame in enumerate(names):
                i = position.get(frame, position.get(_renumbered(frame)))
                if i is not None:
                    if maps[i].shape != gt[t].shape:
                        raise DataError(f"{name}/{frame}: prediction {maps[i].shape} and ground truth {gt[t].shape}")
                    pred[t] = maps[i]
        report.sequences.append(evaluate_sequence(gt, pred, name))
    return report


def _renumbered(stem: str) -> str:
    return f"{int(stem):05d}" if stem.isdigit() else stem


def write_report(report: VideoReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2))
