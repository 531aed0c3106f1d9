"""Smart-tool requests: Label Studio's interactive context -> a prompt in image pixels, or the
strokes of a smart brush to refine."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from usam_backend.core.errors import UsamError
from usam_backend.core.rle import BrushRLEError, check_brush_rle, decode_brush_rle
from usam_backend.labelstudio.config import MASK_LIKE, LabelConfig, ProjectLabel, PromptTool


class PromptError(UsamError):
    """An interactive request whose prompt cannot be turned into a mask."""


@dataclass(frozen=True)
class Prompt:
    """A smart-tool prompt as Label Studio sends it (percent coordinates)."""

    label: ProjectLabel  # the label the answer carries, in its control's shape
    image: str
    points: list[tuple[float, float]]  # percent of width, height
    point_labels: list[int]  # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None  # x, y, width, height in percent

    def pixels(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(n, 2) XY points, (n,) labels and an XYXY box (or None), in pixels of an HxW image."""
        points = np.array([[x * width / 100, y * height / 100] for x, y in self.points], dtype=np.float32)
        box = None
        if self.box is not None:
            x, y, w, h = self.box
            box = np.array([x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100])
        return points.reshape(-1, 2), np.array(self.point_labels, dtype=np.int64), box


def parse_prompt(context: list[Any], config: LabelConfig) -> Prompt:
    """Smart-tool context (keypoints, a rectangle) -> the prompt and the label its answer carries.

    The answer takes the shape of the project: a box drawn with a ``<RectangleLabels>`` that the
    project predicts is answered with a box (snapped to the object); any other prompt with the
    label's brush mask, polygon, ellipse or box, in that order of preference. An item without
    ``from_name`` or ``to_name`` (as Label Studio's SAM example sends them) is matched to the
    config's only prompt tool of its type.
    """
    points: list[tuple[float, float]] = []
    point_labels: list[int] = []
    box = None
    label = None
    image = None
    for item in context:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        kind, value = item.get("type"), item["value"]
        names = value.get(str(kind)) or []
        if kind not in ("keypointlabels", "rectanglelabels") or not names:
            continue
        tool = _prompt_tool(item, str(kind), config)
        where = item.get("to_name") or (tool.image if tool else None)
        if where is None:
            raise PromptError(f"a {kind} prompt has no to_name: send the name of the image it is on")
        image = image or str(where)
        if label is None:
            boxed = tool is not None and any(
                lab.control == tool.control and lab.kind == "rectanglelabels" for lab in config.labels
            )
            label = config.shape_label(str(names[0]), image, ("rectanglelabels",) if boxed else MASK_LIKE)
        try:
            if kind == "keypointlabels":
                points.append((float(value["x"]), float(value["y"])))
                point_labels.append(0 if item.get("is_positive") is False else 1)
            else:
                box = (float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"]))
        except (KeyError, TypeError, ValueError):
            raise PromptError(f"a {kind} prompt lacks numeric x, y (and width, height)") from None
    if image is None or (not points and box is None):
        raise PromptError("the interactive context holds no keypoint or rectangle with a label")
    if image not in config.images:
        raise PromptError(f"the prompt is on {image!r}, which has no labelled regions in the label config")
    if label is None:
        raise PromptError("the prompt's label is not a label of a brush, polygon, rectangle or ellipse control here")
    return Prompt(label, image, points, point_labels, box)


def _prompt_tool(item: dict[str, Any], kind: str, config: LabelConfig) -> PromptTool | None:
    """The prompt tool an item was drawn with: by its ``from_name``, else the config's only one of
    its type (None: a ``from_name`` the config has no prompt tool for; its ``to_name`` decides)."""
    name = item.get("from_name")
    if name is not None:
        return config.prompt_tools.get(str(name))
    tools = [tool for tool in config.prompt_tools.values() if tool.kind == kind]
    if len(tools) != 1:
        raise PromptError(
            f"a {kind} prompt has no from_name, and the config has {len(tools)} smart {kind} tools: "
            "send from_name and to_name to say which"
        )
    return tools[0]


@dataclass(frozen=True)
class BrushStroke:
    """One brush region of a smart-brush request: its id, label, image, and its RLE with the size
    it states (Label Studio's ``original_height``, ``original_width``: the image's natural size).

    The RLE is decoded when asked for: :meth:`mask_on` compares the stated size with the image's
    first, so a stroke cannot make the server decode more pixels than the image has."""

    id: str
    label: ProjectLabel
    image: str
    rle: list[int]
    height: int
    width: int
    item_index: int | None = None  # the frame of a frame sequence

    def mask_on(self, height: int, width: int) -> np.ndarray:
        """The (H, W) bool mask on an HxW image.

        Raises:
            PromptError: the stroke states another size, or its RLE is not that of its size.
        """
        if (self.height, self.width) != (height, width):
            raise PromptError(
                f"a stroke is ({self.width}, {self.height}) (W, H), the image ({width}, {height}): strokes must be "
                "drawn at the image's natural size"
            )
        return self.mask

    @cached_property
    def mask(self) -> np.ndarray:
        """The (H, W) bool mask at the size the stroke states (:meth:`mask_on` checks it first)."""
        try:
            return decode_brush_rle(self.rle, self.height, self.width)
        except BrushRLEError as exc:
            raise _unreadable(exc) from None


def parse_brush_strokes(context: list[Any], config: LabelConfig) -> list[BrushStroke]:
    """The smart brush's regions in an interactive context (empty when it holds none).

    Label Studio sends every brush region of the annotation with the stroke's label and image;
    each comes back refined under its own id, so that accepting the suggestion replaces the rough
    region (Label Studio's ``acceptSuggestion`` puts a suggestion in place of the region with its id)."""
    strokes: list[BrushStroke] = []
    for item in context:
        if not isinstance(item, dict) or item.get("type") != "brushlabels":
            continue
        value = _value(item)
        names = value.get("brushlabels") or []
        image = str(item.get("to_name"))
        if not names or image not in config.images:
            raise PromptError("a smart brush stroke has no label, or is on an image without BrushLabels")
        label = config.brush_label(str(names[0]), image)
        if label is None:
            raise PromptError(f"the stroke's label {names[0]!r} is not a BrushLabels label of {image!r}")
        frame = _item_index(item) if config.images[image].sequence else None
        stroke_id = str(item.get("id") or f"stroke-{len(strokes)}")
        strokes.append(BrushStroke(stroke_id, label, image, *_stroke(item, value), frame))
    return strokes


def _item_index(item: dict[str, Any]) -> int:
    """A frame-sequence region's frame: its top-level ``item_index`` (missing: frame 0)."""
    raw = item.get("item_index", 0)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise PromptError(f"a smart brush stroke has item_index {str(raw)[:20]!r}: expected a frame number (0, 1, ...)")
    return raw


def _value(item: dict[str, Any]) -> dict[str, Any]:
    value = item.get("value")
    return value if isinstance(value, dict) else {}


def _stroke(item: dict[str, Any], value: dict[str, Any]) -> tuple[list[int], int, int]:
    """A stroke's RLE and the (H, W) it states; only the RLE's header is read here."""
    try:
        height, width = int(item["original_height"]), int(item["original_width"])
        rle = value["rle"]
        if value.get("format", "rle") != "rle" or not isinstance(rle, list):
            raise ValueError("not an RLE brush")
        check_brush_rle(rle, height, width)
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(exc) from None
    return rle, height, width


def _unreadable(reason: Exception) -> PromptError:
    return PromptError(f"a smart brush stroke could not be read ({reason}): expected RLE at the image's size")
