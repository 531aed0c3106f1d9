"""Label Studio results read back into typed regions: masks and boxes in pixels, and video box tracks
expanded frame by frame.

Shapes (percent coordinates of the image, ``../shared/docs/label-studio-contract.md``):

- ``brushlabels``/``brush``: the brush RLE, decoded within bounds at the image's size;
- ``polygonlabels``/``polygon``: the points, rasterised as COCO readers do (:func:`polygons_mask`);
- ``rectanglelabels``/``rectangle``: ``x``, ``y`` is the top-left corner, and ``rotation`` (degrees,
  clockwise on screen) turns the rectangle about that corner, as Label Studio's editor does;
- ``ellipselabels``/``ellipse``: centre ``x``, ``y``, radii in percent of the width and the height;
- ``videorectangle``: a track, expanded frame by frame by :func:`expand_keyframes`.

A region's label is the first of ``value[<type>]`` (or ``value["labels"]``, or a ``labels`` result
with the same id, as ``<Rectangle>`` + ``<Labels>`` configs write). Frame sequences give each region
its top-level ``item_index`` (0-based; missing means 0). A result that cannot be read becomes an
:class:`AnnotationError` naming the task and the region, and the task's other regions are kept.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from usam_backend.core.errors import UsamError
from usam_backend.core.masks import mask_boxes
from usam_backend.core.rle import decode_brush_rle
from usam_backend.core.shapes import Ellipse, ellipse_mask, polygons_mask

SHAPES = {
    "brushlabels": "brush", "brush": "brush",
    "polygonlabels": "polygon", "polygon": "polygon",
    "rectanglelabels": "rectangle", "rectangle": "rectangle",
    "ellipselabels": "ellipse", "ellipse": "ellipse",
}  # fmt: skip
"""Result types that carry a region of an image, and the shape each one is."""
VIDEO_TRACK = "videorectangle"

MAX_COORDINATE = 1000.0
"""Percent coordinates and sizes beyond ±1000 % of the image are refused: no editor draws them, and
COCO's polygon rasteriser is not safe with them."""
MAX_STATED_FRAMES = 1_000_000
"""A track's ``framesCount`` believed when the video's own frame count is unknown."""

Size = tuple[int, int]
"""(height, width) in pixels."""


class AnnotationError(UsamError):
    """A Label Studio result that cannot be read as a region."""


@dataclass(frozen=True)
class MediaObject:
    """An ``<Image>`` or ``<Video>`` of the config: its name (results' ``to_name``), the task data
    key it reads, and its kind: ``image``, ``sequence`` (``valueList``) or ``video``."""

    name: str
    key: str
    kind: str


@dataclass(frozen=True)
class ProjectSchema:
    """What an export needs from a label config: the media objects and every label, in config order."""

    objects: dict[str, MediaObject]
    labels: tuple[str, ...]

    @classmethod
    def read(cls, xml: str) -> ProjectSchema:
        """Raises :class:`AnnotationError` for a config the SDK cannot parse."""
        try:
            interface = LabelInterface(xml)
        except Exception as exc:  # the SDK raises XML, key and value errors alike
            raise AnnotationError(f"the label config could not be parsed: {str(exc).splitlines()[0][:200]}") from None
        objects = {}
        for obj in interface.objects:
            attrs = {str(k).lower(): v for k, v in (obj.attr or {}).items()}
            value = str(attrs.get("valuelist") or obj.value or "")
            if obj.tag in ("Image", "Video") and value.startswith("$"):
                kind = "video" if obj.tag == "Video" else "sequence" if attrs.get("valuelist") else "image"
                objects[obj.name] = MediaObject(obj.name, value[1:], kind)
        labels: dict[str, None] = {}
        for control in interface.controls:
            if any(name in objects for name in control.to_name or []):
                labels.update(dict.fromkeys(v for v in (getattr(control, "labels_attrs", None) or {}) if v))
        return cls(objects, tuple(labels))


@dataclass(frozen=True)
class Region:
    """One labelled region of an image (or of a frame of a sequence).

    ``mask``: (H, W) bool at the image's size. ``box``: XYXY float pixels, the shape's own bounds
    within the image. ``polygons``: (n, 2) XY pixel outlines when the shape is one (polygons,
    rectangles), else empty."""

    label: str
    control: str  # from_name
    image: str  # to_name
    frame: int  # item_index of a frame sequence (0-based), 0 for a single image
    shape: str  # brush, polygon, rectangle or ellipse
    mask: np.ndarray
    box: np.ndarray
    polygons: tuple[np.ndarray, ...] = ()
    score: float | None = None
    id: str | None = None


@dataclass(frozen=True)
class VideoTrack:
    """A ``videorectangle`` result as Label Studio shows it: ``boxes`` maps each frame where the box
    is drawn (1-based) to its XYXY float pixel box (a rotated box: its axis-aligned bounds)."""

    id: str
    label: str
    control: str
    video: str
    boxes: dict[int, np.ndarray]
    score: float | None = None


@dataclass
class ReadResults:
    regions: list[Region] = field(default_factory=list)
    tracks: list[VideoTrack] = field(default_factory=list)
    errors: list[AnnotationError] = field(default_factory=list)
    ignored: int = 0  # results of other types (choices, text, keypoints, ...)


def read_results(
    results: Iterable[Any], *, task: object, size: Callable[[str, int], Size | None],
    frames: Callable[[str], int | None] = lambda name: None, track_frames: Iterable[int] | None = None,
) -> ReadResults:  # fmt: skip
    """Every region and video track of one annotation's (or prediction's) ``result`` list.

    Args:
        task: the task's id, named in errors.
        size: (height, width) of the image ``to_name``'s frame ``item_index``, or None to trust the
            result's ``original_height``/``original_width``; for a video, its frame size.
        frames: a video's frame count (Label Studio's editor draws up to the video's own length);
            when it is unknown, a track's ``framesCount`` (at most :data:`MAX_STATED_FRAMES`).
        track_frames: the only frames a track's boxes are computed on (default: every frame drawn).
    """
    items = [r for r in results] if isinstance(results, list) else []
    labels_by_id = {
        str(r.get("id")): _first_label(r.get("value"), "labels")
        for r in items
        if isinstance(r, dict) and r.get("type") == "labels" and r.get("id") is not None
    }
    out = ReadResults()
    for position, result in enumerate(items):
        where = f"task {task}, region {_name(result, position)}"
        kind = str(result.get("type") or "").lower() if isinstance(result, dict) else ""
        if kind not in SHAPES and kind != VIDEO_TRACK:
            out.ignored += 1
            continue
        try:
            label = _first_label(result.get("value"), kind) or labels_by_id.get(str(result.get("id")))
            if not label:
                raise ValueError(f"no label (value.{kind} and value.labels are empty)")
            if kind == VIDEO_TRACK:
                out.tracks.append(read_track(result, label, size, frames, track_frames))
            else:
                out.regions.append(read_region(result, label, size))
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, UsamError) as exc:
            out.errors.append(AnnotationError(f"{where} ({kind}): {_reason(exc)}"))
    return out


def read_region(result: dict[str, Any], label: str, size: Callable[[str, int], Size | None]) -> Region:
    """One image region; raises ``ValueError``/``TypeError``/``KeyError``/``UsamError`` when unreadable."""
    shape = SHAPES[str(result["type"]).lower()]
    value = result.get("value")
    if not isinstance(value, dict):
        raise ValueError("value is not an object")
    image, control = str(result.get("to_name") or ""), str(result.get("from_name") or "")
    frame = int(result.get("item_index") or 0)
    if frame < 0:
        raise ValueError(f"item_index {frame} is negative")
    height, width = _size(result, size(image, frame))
    polygons: tuple[np.ndarray, ...] = ()
    if shape == "brush":
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            raise ValueError("a brush region needs value.format 'rle' and a list value.rle")
        mask = decode_brush_rle(value["rle"], height, width)
        box = _mask_box(mask)
    elif shape == "polygon":
        points = np.asarray(value["points"], dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValueError(f"a polygon needs at least 3 [x, y] points, got shape {points.shape}")
        if not (np.abs(points) <= MAX_COORDINATE).all():
            raise ValueError(f"a polygon point lies beyond ±{MAX_COORDINATE:g} % of the image")
        polygons = (_finite(points * [width / 100, height / 100]),)
        mask = polygons_mask(list(polygons), height, width)
        box = _bounds(polygons[0], height, width)
    elif shape == "rectangle":
        corners = rectangle_corners(value, height, width)
        polygons = (corners,)
        mask = polygons_mask([corners], height, width)
        box = _bounds(corners, height, width)
    else:
        cx, cy = _number(value, "x") * width / 100, _number(value, "y") * height / 100
        rx, ry = _number(value, "radiusX") * width / 100, _number(value, "radiusY") * height / 100
        rotation = _angle(value)
        ellipse = Ellipse(cx, cy, abs(rx), abs(ry), rotation)
        mask = ellipse_mask(ellipse, height, width)
        box = _bounds(_ellipse_outline(ellipse), height, width)
    score = result.get("score")
    return Region(label, control, image, frame, shape, mask, box, polygons,
                  float(score) if isinstance(score, int | float) else None,
                  str(result["id"]) if result.get("id") is not None else None)  # fmt: skip


def rectangle_corners(value: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """(4, 2) XY pixel corners of a Label Studio rectangle: top-left ``x``, ``y``, then clockwise
    on screen, the whole turned by ``rotation`` degrees (clockwise on screen) about the top-left."""
    x, y = _number(value, "x") * width / 100, _number(value, "y") * height / 100
    w, h = _number(value, "width") * width / 100, _number(value, "height") * height / 100
    theta = math.radians(_angle(value))
    c, s = math.cos(theta), math.sin(theta)
    local = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    turned = local @ np.array([[c, s], [-s, c]])  # (u, v) -> (u c - v s, u s + v c): clockwise with y down
    return _finite(turned + np.array([x, y]))


# --- video tracks ----------------------------------------------------------------------------


def expand_keyframes(
    sequence: list[dict[str, Any]], frames_count: int, at: Iterable[int] | None = None
) -> dict[int, dict[str, float]]:
    """The box Label Studio draws on each frame (1-based) of a ``videorectangle``, in percent:
    ``{frame: {x, y, width, height, rotation}}``; with ``at``, only on those of the frames (the
    other frames cost nothing).

    Followed from Label Studio's editor (HumanSignal/label-studio ``web/libs/editor/src/regions``:
    ``VideoRegion.js`` ``isInLifespan``/``closestKeypoint``, ``VideoRectangleRegion.js``
    ``getShape``, ``utils/props.ts`` ``interpolateProp``; the same code is in Label Studio 1.23.2's
    bundle, ``web/dist/apps/labelstudio/358.js``), which draws a box where
    ``isInLifespan(frame) && getShape(frame)``:

    - keyframes are taken in frame order (the editor keeps them sorted; it reads an unsorted
      sequence in stored order, which is sorted here); nothing is drawn before the first one;
    - between two keyframes every property is linear in the frame, rotation along the shorter way
      round (``normalizeAngle`` to (-180, 180]);
    - a frame is drawn when the last keyframe at or before it is ``enabled``, and on a disabled
      keyframe's own frame: ``enabled: false`` ends a segment after that frame;
    - after the last keyframe, when it is enabled, its box holds to the video's last frame;
    - frames outside 1..``frames_count`` are never shown; of two keyframes on one frame the later
      in the list decides.

    The SDK's server-side ``extract_key_frames`` agrees on which frames are drawn; it interpolates
    rotation linearly, not the short way round.
    """
    wanted = None if at is None else sorted(set(at))
    drawn: dict[int, dict[str, float]] = {}
    for key, nxt, frames in _segments(sequence, frames_count):
        chosen = (
            frames if wanted is None else wanted[bisect_left(wanted, frames.start) : bisect_left(wanted, frames.stop)]
        )
        for frame in chosen:
            drawn[frame] = _props(key) if nxt is None or frame == key["frame"] else _between(key, nxt, frame)
    return dict(sorted(drawn.items()))


def drawn_frames(sequence: list[dict[str, Any]], frames_count: int) -> list[range]:
    """The frames (1-based) :func:`expand_keyframes` draws a box on, as ranges in frame order,
    without computing any box (cheap however long the video)."""
    return [frames for _, _, frames in _segments(sequence, frames_count) if frames]


def _segments(
    sequence: list[dict[str, Any]], frames_count: int
) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None, range]]:
    """Per keyframe in frame order: it, the keyframe it interpolates towards (None: it holds or is
    disabled) and the frames within 1..``frames_count`` it decides; the ranges do not overlap."""
    keys = sorted((_keyframe(k) for k in sequence), key=lambda k: k["frame"])
    for i, key in enumerate(keys):
        start = int(key["frame"])
        nxt = keys[i + 1] if i + 1 < len(keys) else None
        if nxt is not None and int(nxt["frame"]) == start:
            continue  # a repeated frame: the later keyframe decides, as closestKeypoint takes the last
        if not key["enabled"]:
            stop, nxt = start + 1, None
        else:
            stop = int(nxt["frame"]) if nxt is not None else frames_count + 1
        yield key, nxt, range(max(start, 1), min(stop, frames_count + 1))


def read_track(
    result: dict[str, Any], label: str, size: Callable[[str, int], Size | None], frames: Callable[[str], int | None],
    at: Iterable[int] | None = None,
) -> VideoTrack:  # fmt: skip
    """A ``videorectangle`` result's boxes, on every frame it is drawn on (``at``: only on those of
    these frames; ``at=()`` checks the track and computes no box)."""
    value = result.get("value")
    if not isinstance(value, dict) or not isinstance(value.get("sequence"), list) or not value["sequence"]:
        raise ValueError("a videorectangle needs a non-empty value.sequence")
    video = str(result.get("to_name") or "")
    known = size(video, 0)
    if known is None:
        raise ValueError(f"the size of video {video!r} is unknown")
    height, width = known
    frames_count = frames(video)
    if not frames_count:
        count = value.get("framesCount")
        if not isinstance(count, int | float) or not 0 < count <= MAX_STATED_FRAMES:
            raise ValueError(f"the video's frame count is unknown and value.framesCount is {count!r}, not 1 to "
                             f"{MAX_STATED_FRAMES:,}")  # fmt: skip
        frames_count = int(count)
    boxes = {}
    for frame, props in expand_keyframes(value["sequence"], int(frames_count), at).items():
        boxes[frame] = _bounds(rectangle_corners(props, height, width), height, width)
    score = result.get("score")
    return VideoTrack(str(result.get("id") or ""), label, str(result.get("from_name") or ""), video, boxes,
                      float(score) if isinstance(score, int | float) else None)  # fmt: skip


def _keyframe(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError("a keyframe is not an object")
    frame = item.get("frame")
    if not isinstance(frame, int | float) or frame != int(frame):
        raise ValueError(f"a keyframe's frame is {frame!r}, not a whole number")
    return {**item, "frame": int(frame), "enabled": item.get("enabled", True) is not False,
            **{k: _number(item, k) for k in ("x", "y", "width", "height")},
            "rotation": _angle(item)}  # fmt: skip


def _props(key: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(key[k]) for k in ("x", "y", "width", "height", "rotation")}


def _between(start: Mapping[str, Any], end: Mapping[str, Any], frame: int) -> dict[str, float]:
    r = (frame - start["frame"]) / (end["frame"] - start["frame"])
    out = {k: start[k] + (end[k] - start[k]) * r for k in ("x", "y", "width", "height")}
    out["rotation"] = normalize_angle(start["rotation"] + normalize_angle(end["rotation"] - start["rotation"]) * r)
    return out


def normalize_angle(angle: float) -> float:
    """An angle in (-180, 180], as Label Studio's ``normalizeAngle`` (which subtracts 360 while the
    angle is positive, then wraps)."""
    a = angle - 360 * math.ceil(angle / 360) if angle > 0 else angle
    return math.fmod(a - 180, 360) + 180


# --- helpers ---------------------------------------------------------------------------------


def _first_label(value: Any, kind: str) -> str | None:
    if not isinstance(value, dict):
        return None
    for key in (kind, "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def _size(result: dict[str, Any], known: Size | None) -> Size:
    if known is not None:
        stated = (result.get("original_height"), result.get("original_width"))
        if result.get("type") in ("brushlabels", "brush") and None not in stated and stated != known:
            raise ValueError(f"the brush was drawn on a {stated[1]}x{stated[0]} image, the image is "
                             f"{known[1]}x{known[0]}")  # fmt: skip
        return known
    height, width = result.get("original_height"), result.get("original_width")
    if not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
        raise ValueError("original_width and original_height are missing and the image's size is unknown")
    return height, width


def _angle(value: Mapping[str, Any]) -> float:
    """``value.rotation`` in degrees (0 when missing), a finite number."""
    angle = value.get("rotation") or 0
    if isinstance(angle, bool) or not isinstance(angle, int | float) or not math.isfinite(angle):
        raise ValueError(f"value.rotation is {angle!r}, not a number of degrees")
    return float(angle)


def _number(value: Mapping[str, Any], key: str) -> float:
    """A percent coordinate or size, within ±:data:`MAX_COORDINATE`."""
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, int | float) or not abs(number) <= MAX_COORDINATE:
        raise ValueError(f"value.{key} is {number!r}, not a number within ±{MAX_COORDINATE:g} %")
    return float(number)


def _finite(points: np.ndarray) -> np.ndarray:
    if not np.isfinite(points).all():
        raise ValueError("a point is not a finite number")
    return points


def _bounds(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """XYXY bounds of XY points, clipped to the image."""
    low, high = points.min(axis=0), points.max(axis=0)
    return np.clip(np.array([low[0], low[1], high[0], high[1]]), 0, [width, height, width, height])


def _mask_box(mask: np.ndarray) -> np.ndarray:
    return mask_boxes(mask[None])[0].astype(np.float64)


def _ellipse_outline(ellipse: Ellipse, points: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    theta = math.radians(ellipse.rotation)
    u, v = ellipse.rx * np.cos(t), ellipse.ry * np.sin(t)
    return np.stack([ellipse.cx + u * math.cos(theta) - v * math.sin(theta),
                     ellipse.cy + u * math.sin(theta) + v * math.cos(theta)], axis=1)  # fmt: skip


def _name(result: Any, position: int) -> str:
    rid = result.get("id") if isinstance(result, dict) else None
    return f"{rid} (#{position + 1})" if rid is not None else f"#{position + 1}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"value.{exc.args[0]} is missing"
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
