"""``usam export``: a Label Studio project's annotations (or its predictions of one model version) in
the formats Label Studio cannot write.

Outputs in ``--out DIR`` (each kind with ``--format``):

- ``images/<stem>.<ext>``: the task images, fetched once through the guarded media fetcher (a frame of
  a sequence is ``<sequence>_<frame:05d>``); ``<stem>`` is ``task-<id>``, plus ``_<image name>`` when
  the config has several images;
- ``coco``: ``coco.json``, COCO instance segmentation: one annotation per region (brush, polygon,
  rectangle, ellipse) with a compressed RLE mask, its box and area; categories in config order, ids 1..n;
- ``yolo``: Ultralytics' segmentation layout: ``data.yaml`` (``train``/``val``: ``images``, ``names``),
  ``classes.txt``, and ``labels/<stem>.txt`` beside ``images/`` with one line per polygon,
  ``<class> x1 y1 x2 y2 ...`` normalised to 0-1 (a region in several parts: one line per part);
- ``masks``: ``masks/<stem>.png``, semantic label maps (palette PNG, pixel = class index + 1, 0 =
  background, later regions on top), the format ``usam refine`` and ``usam eval masks`` read;
- for frame sequences and ``<Video>`` tracks: ``mot``: MOTChallenge ``mot/<seq>/gt/gt.txt``
  (``frame,id,left,top,width,height,1,class,1``, frames and pixel coordinates 1-based as in the
  challenge's files) with ``seqinfo.ini`` and ``mot/seqmap.txt``; ``davis``: ``davis/<seq>/<frame:05d>.png``,
  palette PNGs of track ids (video tracks: their boxes filled; larger objects painted first), the
  format ``usam eval video`` reads; ``mots``: KITTI MOTS text ``mots/<seq>.txt`` (``frame id class
  height width rle``, frames 0-based, id = class x 1000 + track) for sequences with masks.

Which result is exported per task: with ``--from-version V`` the task's prediction of version V,
else its annotations that were not cancelled, and of several the one ``--annotation`` names:
``latest`` (updated last, the default), ``first`` (created first) or ``ground-truth`` (the one marked
ground truth, else the latest). A task without one is left out. A frame sequence's regions are
linked into tracks frame by frame: same label, mask IoU at least ``--link-iou`` with a track's last
mask, one to one (Hungarian). Files already written are kept (a stopped export resumes; ``--overwrite``
writes them again);
``coco.json``, the YOLO lists and the track files are rewritten each run. A region or task that
cannot be read is reported and left out; the rest is exported. Each task's files are written as it
is read, so of a large project only its COCO entries (RLE) are held in memory.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from usam_backend.core.errors import UsamError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.images import peek_size
from usam_backend.core.masks import mask_boxes, mask_iou
from usam_backend.core.settings import Settings
from usam_backend.core.shapes import mask_polygons
from usam_backend.core.video import DEFAULT_FPS, probe_video
from usam_backend.labelstudio.annotations import AnnotationError, MediaObject, ProjectSchema, Region, read_results
from usam_backend.labelstudio.client import LabelStudioApi
from usam_backend.labelstudio.media import TaskImageFetcher, fetcher_for
from usam_backend.labelstudio.projects import project_id
from usam_backend.tools.video_files import indexed_png
from usam_backend.tools.viz import label_map_image

FORMATS = ("coco", "yolo", "masks", "mot", "davis", "mots")
ANNOTATION_RULES = ("latest", "first", "ground-truth")
LINK_IOU = 0.3  # SORT's IoU gate
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


@dataclass(frozen=True)
class ExportOptions:
    project: str
    out: Path
    formats: tuple[str, ...] = FORMATS
    from_version: str | None = None
    annotation: str = "latest"
    link_iou: float = LINK_IOU
    progress: bool = True
    overwrite: bool = False  # fetch and write every file again instead of keeping those on disk


@dataclass
class ImageItem:
    """One exported image (a task image, or a frame of a sequence) and its regions."""

    stem: str
    file: str  # relative to the output folder
    height: int
    width: int
    task: int
    regions: list[Region] = field(default_factory=list)


@dataclass
class Track:
    """One object through a sequence or video: per frame (0-based) its XYXY pixel box, and its mask
    where the shape has one (None for video boxes and rectangles)."""

    number: int
    label: str
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    masks: dict[int, np.ndarray | None] = field(default_factory=dict)


@dataclass
class SequenceItem:
    """A frame sequence or video: ``frames`` frames of ``height`` x ``width`` and its tracks."""

    name: str
    height: int
    width: int
    frames: int
    task: int
    tracks: list[Track] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(m is not None for t in self.tracks for m in t.masks.values())


@dataclass
class ExportReport:
    tasks: int = 0
    exported: int = 0
    regions: int = 0
    tracks: int = 0
    without_result: int = 0
    errors: list[str] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        files = ", ".join(f"{kind} {n}" for kind, n in self.written.items())
        lines = [
            f"exported {self.exported} of {self.tasks} task(s): {self.regions} region(s), {self.tracks} track(s) "
            f"in {self.seconds:.1f} s; {self.without_result} task(s) without a result to export",
            f"files: {files}",
        ]
        lines += [f"  {error}" for error in self.errors[:20]]
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more")
        return "\n".join(lines)


# --- choosing a task's result ----------------------------------------------------------------


def choose_result(task: dict[str, Any], *, from_version: str | None, rule: str = "latest") -> list[Any] | None:
    """The ``result`` list to export for a task, by the rule the module docs state; None if none."""
    if rule not in ANNOTATION_RULES:
        raise UsamError(f"--annotation {rule!r}: choose one of {', '.join(ANNOTATION_RULES)}")
    if from_version is not None:
        found = [p for p in task.get("predictions") or [] if isinstance(p, dict)
                 and str(p.get("model_version")) == from_version]  # fmt: skip
    else:
        found = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not found:
        return None
    if rule == "ground-truth":
        found = [a for a in found if a.get("ground_truth")] or found
    if rule == "first":
        chosen = min(found, key=lambda a: (str(a.get("created_at") or ""), _int(a.get("id"))))
    else:
        chosen = max(found, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), _int(a.get("id"))))
    result = chosen.get("result")
    return result if isinstance(result, list) else []


# --- linking a sequence's regions into tracks ------------------------------------------------


def link_regions(regions: Iterable[Region], min_iou: float = LINK_IOU) -> list[Track]:
    """Tracks from the regions of a frame sequence: frame by frame, each region joins the track of
    its label whose last mask overlaps it most (IoU >= ``min_iou``, one to one by the Hungarian
    method), or starts a new one. Tracks are numbered 1, 2, ... in order of appearance."""
    from scipy.optimize import linear_sum_assignment

    tracks: list[Track] = []
    last: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # track index -> (mask, int box) of its last region
    by_frame: dict[int, list[Region]] = {}
    for region in regions:
        by_frame.setdefault(region.frame, []).append(region)
    for frame in sorted(by_frame):
        for label in dict.fromkeys(r.label for r in by_frame[frame]):
            current = [r for r in by_frame[frame] if r.label == label]
            open_tracks = [i for i, t in enumerate(tracks) if t.label == label and frame not in t.boxes]
            iou = np.zeros((len(current), len(open_tracks)))
            for a, region in enumerate(current):
                for b, index in enumerate(open_tracks):
                    mask, box = last[index]
                    iou[a, b] = mask_iou(region.mask, _int_box(region.mask), mask, box)
            rows, cols = linear_sum_assignment(-iou) if iou.size else ([], [])
            matched = {int(a): open_tracks[int(b)] for a, b in zip(rows, cols, strict=True) if iou[a, b] >= min_iou}
            for a, region in enumerate(current):
                if a not in matched:
                    tracks.append(Track(len(tracks) + 1, label))
                index = matched.get(a, len(tracks) - 1)
                tracks[index].boxes[frame] = region.box
                tracks[index].masks[frame] = region.mask if region.shape != "rectangle" else None
                last[index] = (region.mask, _int_box(region.mask))
    return tracks


# --- writers ---------------------------------------------------------------------------------


class CocoDocument:
    """COCO instance segmentation built image by image: images, categories (ids 1..n in config
    order) and one annotation per region with a compressed RLE ``segmentation``, ``bbox`` (XYWH)
    and ``area``. Only the RLE is kept, not the masks."""

    def __init__(self, classes: tuple[str, ...]):
        self.category = {name: i + 1 for i, name in enumerate(classes)}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, item: ImageItem) -> None:
        from pycocotools import mask as coco_mask

        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": item.file, "height": item.height, "width": item.width,
                            "label_studio_task": item.task})  # fmt: skip
        for region in item.regions:
            rle = coco_mask.encode(np.asfortranarray(region.mask.astype(np.uint8)))
            x0, y0, x1, y1 = (float(v) for v in region.box)
            annotation = {
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": self.category[region.label],
                "segmentation": {"size": [item.height, item.width], "counts": rle["counts"].decode("ascii")},
                "area": float(coco_mask.area(rle)), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
            }  # fmt: skip
            if region.score is not None:
                annotation["score"] = region.score
            self.annotations.append(annotation)

    def document(self, description: str = "") -> dict[str, Any]:
        categories = [{"id": i, "name": name, "supercategory": ""} for name, i in self.category.items()]
        info = {"description": description, "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return {"info": info, "images": self.images, "annotations": self.annotations, "categories": categories}


def yolo_lines(item: ImageItem, classes: tuple[str, ...]) -> list[str]:
    """Ultralytics segmentation lines of one image: ``<class> x1 y1 ... xn yn``, normalised."""
    index = {name: i for i, name in enumerate(classes)}
    lines = []
    scale = np.array([item.width, item.height], dtype=np.float64)
    for region in item.regions:
        polygons = region.polygons or tuple(mask_polygons(region.mask))
        for polygon in polygons:
            points = np.clip(np.asarray(polygon) / scale, 0.0, 1.0)
            if len(points) >= 3:
                lines.append(f"{index[region.label]} " + " ".join(f"{v:.6f}" for v in points.ravel()))
    return lines


def label_map(item: ImageItem, classes: tuple[str, ...]) -> np.ndarray:
    """(H, W) class index + 1 per pixel, 0 background; later regions on top."""
    index = {name: i + 1 for i, name in enumerate(classes)}
    out = np.zeros((item.height, item.width), dtype=np.int32)
    for region in item.regions:
        out[region.mask] = index[region.label]
    return out


def id_maps(sequence: SequenceItem) -> np.ndarray:
    """(T, H, W) uint8 track numbers per frame (0: nothing): masks, or boxes filled where a track
    has no mask; larger objects painted first, so a small one in front stays visible."""
    if len(sequence.tracks) > 255:
        raise UsamError(f"{sequence.name}: {len(sequence.tracks)} tracks; a palette PNG holds 255")
    maps = np.zeros((sequence.frames, sequence.height, sequence.width), dtype=np.uint8)
    for frame in range(sequence.frames):
        painted = []
        for track in sequence.tracks:
            if frame in track.boxes:
                mask = track.masks.get(frame)
                if mask is None:
                    mask = _box_mask(track.boxes[frame], sequence.height, sequence.width)
                painted.append((int(mask.sum()), track.number, mask))
        for _, number, mask in sorted(painted, key=lambda p: (-p[0], p[1])):
            maps[frame][mask] = number
    return maps


def mot_lines(sequence: SequenceItem, classes: tuple[str, ...]) -> list[str]:
    """MOTChallenge ground-truth lines: ``frame,id,left,top,width,height,1,class,1`` (1-based frames,
    classes and pixel coordinates, as the challenge's files and ``motmetrics`` read them)."""
    index = {name: i + 1 for i, name in enumerate(classes)}
    rows = []
    for track in sequence.tracks:
        for frame, (x0, y0, x1, y1) in track.boxes.items():
            rows.append((frame + 1, track.number, f"{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f}",
                         index[track.label]))  # fmt: skip
    return [f"{f},{n},{box},1,{c},1" for f, n, box, c in sorted(rows)]


def mots_lines(sequence: SequenceItem, maps: np.ndarray, classes: tuple[str, ...]) -> list[str]:
    """KITTI MOTS lines ``frame id class height width rle`` from the sequence's id maps (masks do not
    overlap there): frames 0-based, id = class x 1000 + track number, COCO compressed RLE."""
    from pycocotools import mask as coco_mask

    index = {name: i + 1 for i, name in enumerate(classes)}
    lines = []
    for frame, ids in enumerate(maps):
        for track in sequence.tracks:
            mask = ids == track.number
            if mask.any():
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                cls = index[track.label]
                lines.append(f"{frame} {cls * 1000 + track.number} {cls} {sequence.height} {sequence.width} "
                             f"{rle['counts'].decode('ascii')}")  # fmt: skip
    return lines


def write_outputs(out: Path, formats: tuple[str, ...], classes: tuple[str, ...], images: list[ImageItem],
                  sequences: list[SequenceItem], *, description: str = "") -> dict[str, int]:  # fmt: skip
    """Every asked format of the given images and sequences: :func:`write_items` then
    :func:`write_lists`. Returns the files written per kind."""
    coco = CocoDocument(classes)
    written = write_items(out, formats, classes, images, sequences, coco)
    later = write_lists(out, formats, classes, coco, [s.name for s in sequences], description=description)
    return {kind: written.get(kind, 0) + later.get(kind, 0) for kind in {**written, **later}}


def write_items(
    out: Path, formats: tuple[str, ...], classes: tuple[str, ...], images: list[ImageItem],
    sequences: list[SequenceItem], coco: CocoDocument, *, overwrite: bool = False,
) -> dict[str, int]:  # fmt: skip
    """The per-image and per-sequence files of some images and sequences (one task's), and their
    COCO entries added to ``coco``. Per-image and per-frame files already on disk are kept unless
    ``overwrite``."""
    written: dict[str, int] = {}
    for item in images:
        if "coco" in formats:
            coco.add(item)
        if "yolo" in formats:
            lines = "".join(f"{line}\n" for line in yolo_lines(item, classes))
            _put(written, "yolo", out / "labels" / f"{item.stem}.txt", _text(lines), always=overwrite)
        path = out / "masks" / f"{item.stem}.png"
        if "masks" in formats and (overwrite or not path.exists()):
            _put(written, "masks", path, _png(label_map_image(label_map(item, classes), len(classes))), always=True)
    for sequence in sequences:
        folder = out / "mot" / sequence.name
        if "mot" in formats:
            lines = "".join(f"{x}\n" for x in mot_lines(sequence, classes))
            _put(written, "mot", folder / "gt" / "gt.txt", _text(lines), always=True)
            info = (f"[Sequence]\nname={sequence.name}\nimDir=img1\nframeRate={DEFAULT_FPS:g}\n"
                    f"seqLength={sequence.frames}\nimWidth={sequence.width}\nimHeight={sequence.height}\n"
                    "imExt=.png\n")  # fmt: skip
            _put(written, "mot", folder / "seqinfo.ini", _text(info), always=True)
        need_maps = "davis" in formats or ("mots" in formats and sequence.has_masks)
        maps = id_maps(sequence) if need_maps else None
        if "davis" in formats and maps is not None:
            for frame, ids in enumerate(maps):
                path = out / "davis" / sequence.name / f"{frame:05d}.png"
                _put(written, "davis", path, _png(indexed_png(ids)), always=overwrite)
        if "mots" in formats and maps is not None and sequence.has_masks:
            lines = "".join(f"{x}\n" for x in mots_lines(sequence, maps, classes))
            _put(written, "mots", out / "mots" / f"{sequence.name}.txt", _text(lines), always=True)
    return written


def write_lists(out: Path, formats: tuple[str, ...], classes: tuple[str, ...], coco: CocoDocument,
                sequence_names: list[str], *, description: str = "") -> dict[str, int]:  # fmt: skip
    """The files that list everything, rewritten each run: ``coco.json``, ``data.yaml``,
    ``classes.txt`` and MOT's ``seqmap.txt``."""
    written: dict[str, int] = {}
    if "coco" in formats:
        _put(written, "coco", out / "coco.json", _text(json.dumps(coco.document(description))), always=True)
    if "yolo" in formats:
        names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in enumerate(classes))
        data = f"train: images\nval: images\nnc: {len(classes)}\nnames:\n{names}"
        _put(written, "yolo", out / "data.yaml", _text(data), always=True)
        _put(written, "yolo", out / "classes.txt", _text("".join(f"{name}\n" for name in classes)), always=True)
    if "mot" in formats and sequence_names:
        seqmap = "name\n" + "".join(f"{n}\n" for n in sequence_names)
        _put(written, "mot", out / "mot" / "seqmap.txt", _text(seqmap), always=True)
    return written


def _put(
    written: dict[str, int], kind: str, path: Path, write: Callable[[Path], None], *, always: bool = False
) -> None:
    """Write ``path`` atomically (unless it exists and not ``always``), counting it under ``kind``."""
    if always or not path.exists():
        with atomic_path(path) as tmp:
            write(tmp)
        written[kind] = written.get(kind, 0) + 1


def _text(body: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(body)

    return write


def _png(image: Image.Image) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        image.save(tmp, format="PNG")

    return write


# --- the project -----------------------------------------------------------------------------


class TaskMedia:
    """A task's images and frames on disk under ``out/images`` (fetched once; kept for resume), and
    its videos' sizes and frame counts (probed once; kept in ``out/videos/<name>.json``)."""

    def __init__(self, out: Path, settings: Settings, images: TaskImageFetcher, videos: TaskImageFetcher,
                 *, overwrite: bool = False):  # fmt: skip
        self.overwrite = overwrite
        self.out = out
        self.settings = settings
        self.images = images
        self.videos = videos

    def image(self, stem: str, reference: object, task: int) -> tuple[str, int, int]:
        """(relative file, height, width) of an image, fetched unless already stored."""
        folder = self.out / "images"
        stored = sorted(folder.glob(f"{stem}.*")) if folder.is_dir() else []
        stored = [p for p in stored if not p.name.endswith(".part")]
        if stored and not self.overwrite:
            width, height = peek_size(stored[0], max_pixels=self.settings.max_image_pixels)
            return f"images/{stored[0].name}", height, width
        raw = self.images.fetch(str(reference), task)
        width, height = peek_size(raw, max_pixels=self.settings.max_image_pixels)
        with Image.open(io.BytesIO(raw)) as opened:
            extension = _EXTENSIONS.get(str(opened.format), ".img")
        path = folder / f"{stem}{extension}"
        with atomic_path(path) as tmp:
            tmp.write_bytes(raw)
        return f"images/{path.name}", height, width

    def video(self, name: str, reference: object, task: int) -> tuple[int, int, int]:
        """(frame count, height, width) of a video as displayed."""
        path = self.out / "videos" / f"{name}.json"
        if path.exists() and not self.overwrite:
            known = json.loads(path.read_text())
            return int(known["frames"]), int(known["height"]), int(known["width"])
        raw = self.videos.fetch(str(reference), task)
        frames, _, width, height = probe_video(raw, max_pixels=self.settings.max_image_pixels)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"frames": frames, "height": height, "width": width}))
        return frames, height, width


def collect_task(task: dict[str, Any], result: list[Any], schema: ProjectSchema, media: TaskMedia,
                 options: ExportOptions) -> tuple[list[ImageItem], list[SequenceItem], list[str]]:  # fmt: skip
    """A task's images (with their regions) and sequences (with their tracks), and its errors."""
    tid = _int(task.get("id"))
    raw_data = task.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    several = len(schema.objects) > 1
    errors: list[str] = []
    images: dict[tuple[str, int], ImageItem] = {}
    sequences: dict[str, SequenceItem] = {}
    videos: dict[str, tuple[int, int, int]] = {}
    for obj in schema.objects.values():
        base = f"task-{tid}" + (f"_{_safe(obj.name)}" if several else "")
        try:
            _collect_object(obj, base, data, tid, media, images, sequences, videos)
        except (UsamError, OSError) as exc:
            errors.append(f"task {tid}, {obj.name}: {exc}")

    def size(name: str, frame: int) -> tuple[int, int]:
        if name in videos:
            return videos[name][1], videos[name][2]
        item = images.get((name, frame))
        if item is None:
            what = f"frame {frame} of {name!r}" if (name, 0) in images else f"image {name!r}"
            raise AnnotationError(f"{what} is not in the task (or could not be fetched)")
        return item.height, item.width

    read = read_results(result, task=tid, size=size, frames=lambda name: videos.get(name, (None,))[0])
    errors += [str(e) for e in read.errors]
    for region in read.regions:
        if region.label not in schema.labels:
            errors.append(f"task {tid}, region {region.id}: label {region.label!r} is not in the label config")
        elif not region.mask.any():
            errors.append(f"task {tid}, region {region.id}: covers no pixel of the image")
        else:
            images[(region.image, region.frame)].regions.append(region)
    for name, sequence in sequences.items():
        regions = [r for key, item in images.items() if key[0] == name for r in item.regions]
        sequence.tracks = link_regions(regions, options.link_iou)
    for track in read.tracks:
        if track.label not in schema.labels:
            errors.append(f"task {tid}, region {track.id}: label {track.label!r} is not in the label config")
            continue
        if track.video not in sequences:
            errors.append(f"task {tid}, region {track.id}: {track.video!r} is not a <Video> of the config")
            continue
        sequence = sequences[track.video]
        linked = Track(len(sequence.tracks) + 1, track.label)
        linked.boxes = {frame - 1: box for frame, box in track.boxes.items()}
        linked.masks = dict.fromkeys(linked.boxes)
        sequence.tracks.append(linked)
    return list(images.values()), list(sequences.values()), errors


def _collect_object(obj: MediaObject, base: str, data: dict[str, Any], tid: int, media: TaskMedia,
                    images: dict[tuple[str, int], ImageItem], sequences: dict[str, SequenceItem],
                    videos: dict[str, tuple[int, int, int]]) -> None:  # fmt: skip
    reference = data.get(obj.key)
    if reference is None:
        raise UsamError(f"the task has no '{obj.key}' field")
    if obj.kind == "image":
        file, height, width = media.image(base, reference, tid)
        images[(obj.name, 0)] = ImageItem(base, file, height, width, tid)
    elif obj.kind == "sequence":
        if not isinstance(reference, list) or not reference:
            raise UsamError(f"'{obj.key}' is not a list of frames")
        size = None
        for index, frame in enumerate(reference):
            stem = f"{base}_{index:05d}"
            file, height, width = media.image(stem, frame, tid)
            if size is not None and size != (height, width):
                raise UsamError(f"frame {index} is {width}x{height}, frame 0 {size[1]}x{size[0]}")
            size = (height, width)
            images[(obj.name, index)] = ImageItem(stem, file, height, width, tid)
        assert size is not None
        sequences[obj.name] = SequenceItem(base, size[0], size[1], len(reference), tid)
    else:
        frames, height, width = media.video(base, reference, tid)
        videos[obj.name] = (frames, height, width)
        sequences[obj.name] = SequenceItem(base, height, width, frames, tid)


def run_export(settings: Settings, options: ExportOptions) -> ExportReport:
    """``usam export``: read the project and its tasks from Label Studio, fetch their media, write
    every asked format (see the module docs)."""
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise UsamError(f"unknown export format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    if options.annotation not in ANNOTATION_RULES:
        raise UsamError(f"--annotation {options.annotation!r}: choose one of {', '.join(ANNOTATION_RULES)}")
    started = time.perf_counter()
    pid = project_id(options.project)
    report = ExportReport()
    sequence_names: list[str] = []
    with httpx.Client(follow_redirects=False) as client:
        api = LabelStudioApi.for_project(settings, None, client)
        project = api.project(pid)
        schema = ProjectSchema.read(str(project.get("label_config") or ""))
        if not schema.objects:
            raise UsamError(f"project {pid}'s label config has no <Image> or <Video> reading a task field")
        media = TaskMedia(options.out, settings, fetcher_for(settings, None, client),
                          fetcher_for(settings, None, client, video=True), overwrite=options.overwrite)  # fmt: skip
        coco = CocoDocument(schema.labels)
        tasks = list(api.tasks_with_results(pid))
        report.tasks = len(tasks)
        for task in tqdm(tasks, desc="exporting", unit="task", disable=not options.progress):
            result = choose_result(task, from_version=options.from_version, rule=options.annotation)
            if result is None:
                report.without_result += 1
                continue
            images, sequences, errors = collect_task(task, result, schema, media, options)
            try:
                written = write_items(options.out, options.formats, schema.labels, images, sequences, coco,
                                      overwrite=options.overwrite)  # fmt: skip
            except (UsamError, OSError) as exc:  # e.g. a sequence with more tracks than a palette holds
                report.errors.append(f"task {task.get('id')}: not written: {exc}")
                continue
            _count(report.written, written)
            report.errors += errors
            report.exported += 1
            report.regions += sum(len(item.regions) for item in images)
            report.tracks += sum(len(s.tracks) for s in sequences)
            sequence_names += [s.name for s in sequences]
    source = f"predictions {options.from_version}" if options.from_version else f"annotations ({options.annotation})"
    description = f"Label Studio project {pid}, {source}, exported by usam"
    lists = write_lists(options.out, options.formats, schema.labels, coco, sequence_names, description=description)
    _count(report.written, lists)
    report.seconds = time.perf_counter() - started
    return report


def _count(total: dict[str, int], more: dict[str, int]) -> None:
    for kind, n in more.items():
        total[kind] = total.get(kind, 0) + n


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centres lie inside an XYXY box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cols = (np.arange(width) + 0.5 > x0) & (np.arange(width) + 0.5 < x1)
    rows = (np.arange(height) + 0.5 > y0) & (np.arange(height) + 0.5 < y1)
    return np.asarray(rows[:, None] & cols[None, :])


def _int_box(mask: np.ndarray) -> np.ndarray:
    return mask_boxes(mask[None])[0]


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name)
