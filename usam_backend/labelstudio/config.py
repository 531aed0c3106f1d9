"""What a Label Studio label config asks of usam: labelled regions on images and frame sequences
in the shape of each control, labelled box tracks on videos, and smart prompt tools.

- Every ``<BrushLabels>``, ``<PolygonLabels>``, ``<RectangleLabels>`` and ``<EllipseLabels>`` bound to
  an ``<Image>`` is served, each in its own shape (:data:`SHAPE_TAGS`); one config may hold several.
  A ``<RectangleLabels>`` on an image that a brush, polygon or ellipse control labels is a prompt
  tool only when it is marked ``smart`` or all its labels belong to that control (as in the
  interactive brush template and Label Studio's SAM example): its boxes prompt SAM for that shape
  and are not predicted (on a frame sequence, which has no smart
  tools, every shape control is predicted).
  An ``<Image valueList="$frames">`` is a frame sequence (one task, a list of frames): its regions
  carry each frame's ``item_index``.
- A ``<Video>`` with a ``<VideoRectangle>`` and ``<Labels>`` bound to it is served with one
  ``videorectangle`` track per object; its frame rate is the ``frameRate`` attribute (any case;
  Label Studio's default 24), or the task field it names (``frameRate="$fps"``).
- A label's ``predicted_values`` are the model class names that map onto it (label-studio-ml's
  convention). ``<KeyPointLabels>`` and ``<RectangleLabels>`` on an image act as prompts for
  interactive segmentation.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from usam_backend.core.errors import UsamError
from usam_backend.core.labels import normalise
from usam_backend.core.video import DEFAULT_FPS

MAX_LABEL_CONFIG_BYTES = 1_000_000
PROMPT_TAGS = {"KeyPointLabels": "keypointlabels", "RectangleLabels": "rectanglelabels"}
SHAPE_TAGS = {
    "BrushLabels": "brushlabels",
    "PolygonLabels": "polygonlabels",
    "RectangleLabels": "rectanglelabels",
    "EllipseLabels": "ellipselabels",
}
"""Image controls usam predicts, and the result type of each."""
MASK_LIKE = ("brushlabels", "polygonlabels", "ellipselabels", "rectanglelabels")
"""The shape a keypoint prompt is answered in, when several controls carry its label: the first."""
EXAMPLE = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels></View>'
)


class LabelConfigError(UsamError):
    """The label config is unreadable or asks for nothing usam can predict."""


@dataclass(frozen=True)
class ProjectLabel:
    """A label of a shape or video-rectangle control: its value and the model class names that map onto it."""

    value: str
    control: str  # the shape control's or VideoRectangle's name (from_name)
    image: str  # Image or Video name (to_name)
    aliases: tuple[str, ...] = ()
    kind: str = "brushlabels"  # the result type: a value of SHAPE_TAGS, or "videorectangle"

    @property
    def names(self) -> tuple[str, ...]:
        """Normalised names a head class may carry to serve this label (value first)."""
        return tuple(dict.fromkeys(normalise(n) for n in (self.value, *self.aliases)))


@dataclass(frozen=True)
class ImageField:
    name: str  # the <Image> tag's name (to_name)
    key: str  # the task data key its value refers to ($image -> image)
    sequence: bool = False  # valueList: the key holds a list of frames


@dataclass(frozen=True)
class VideoField:
    name: str  # the <Video> tag's name (to_name)
    key: str  # the task data key of the video's URL
    frame_rate: float = DEFAULT_FPS
    frame_rate_key: str | None = None  # frameRate="$fps": the task data key holding the rate


@dataclass(frozen=True)
class PromptTool:
    control: str
    kind: str  # "keypointlabels" or "rectanglelabels"
    image: str


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a label config usam acts on."""

    labels: tuple[ProjectLabel, ...]
    images: dict[str, ImageField]
    prompt_tools: dict[str, PromptTool]
    digest: str
    videos: dict[str, VideoField] = field(default_factory=dict)

    @property
    def label_values(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(label.value for label in self.labels))

    @property
    def label_set(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Labels with their aliases, order-free: what a head must cover to serve this project."""
        return tuple(sorted({(normalise(label.value), tuple(sorted(label.names))) for label in self.labels}))

    def labels_for_image(self, image: str) -> tuple[ProjectLabel, ...]:
        return tuple(label for label in self.labels if label.image == image)

    def labels_by_class(self, image: str, served: dict[str, int]) -> dict[int, tuple[ProjectLabel, ...]]:
        """Head class index -> the labels on ``image`` it predicts, one per shape; ``served`` maps a
        label's value to the head class serving it. The first label of a shape mapped onto a class wins."""
        found: dict[int, dict[str, ProjectLabel]] = {}
        for label in self.labels_for_image(image):
            if label.value in served:
                found.setdefault(served[label.value], {}).setdefault(label.kind, label)
        return {index: tuple(shapes.values()) for index, shapes in found.items()}

    def brush_label(self, value: str, image: str) -> ProjectLabel | None:
        """The brush label named ``value`` (by value or alias) on ``image``, for smart-brush strokes."""
        return self.shape_label(value, image, ("brushlabels",))

    def shape_label(self, value: str, image: str, kinds: tuple[str, ...] = MASK_LIKE) -> ProjectLabel | None:
        """The label named ``value`` (by value or alias) on ``image`` whose shape comes first in
        ``kinds``: what an interactive answer carries."""
        wanted = normalise(value)
        found = [label for label in self.labels_for_image(image) if wanted in label.names and label.kind in kinds]
        return min(found, key=lambda label: kinds.index(label.kind), default=None)


_PARSED: collections.OrderedDict[str, LabelConfig] = collections.OrderedDict()
_PARSED_LOCK = threading.Lock()
PARSED_KEPT = 256  # configs kept parsed, by content digest (never the XML itself)


def parse_label_config(xml: str) -> LabelConfig:
    """Read a label config; the last :data:`PARSED_KEPT` distinct configs are kept parsed
    (requests and ``/health`` re-read the same few configs all the time).

    Raises:
        LabelConfigError: see :func:`_parse`.
    """
    digest = hashlib.sha256(xml.encode(errors="replace")).hexdigest() if isinstance(xml, str) else ""
    with _PARSED_LOCK:
        if digest in _PARSED:
            _PARSED.move_to_end(digest)
            return _PARSED[digest]
    config = _parse(xml)
    with _PARSED_LOCK:
        _PARSED[digest] = config
        while len(_PARSED) > PARSED_KEPT:
            _PARSED.popitem(last=False)
    return config


def _parse(xml: str) -> LabelConfig:
    """Read a label config.

    Raises:
        LabelConfigError: too large, not XML, not a Label Studio config, or no ``<BrushLabels>``
            bound to an ``<Image>`` with a ``$field`` value.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    size = len(xml.encode())
    if size > MAX_LABEL_CONFIG_BYTES:
        raise LabelConfigError(f"the label config is {size:,} bytes; usam reads at most {MAX_LABEL_CONFIG_BYTES:,}")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise LabelConfigError("the label config declares a DTD or entities, which usam does not accept")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises XML, key and value errors alike
        raise LabelConfigError(f"the label config could not be parsed: {str(exc).splitlines()[0][:200]}") from None
    images: dict[str, ImageField] = {}
    videos: dict[str, VideoField] = {}
    for obj in interface.objects:
        attrs = {str(k).lower(): v for k, v in (obj.attr or {}).items()}
        value = str(attrs.get("valuelist") or obj.value or "")
        if not value.startswith("$"):
            continue
        if obj.tag == "Image":
            images[obj.name] = ImageField(obj.name, value[1:], sequence=bool(attrs.get("valuelist")))
        elif obj.tag == "Video":
            raw_rate = str(attrs.get("framerate") or "")
            if raw_rate.startswith("$"):
                videos[obj.name] = VideoField(obj.name, value[1:], DEFAULT_FPS, raw_rate[1:])
            else:
                videos[obj.name] = VideoField(obj.name, value[1:], _frame_rate(raw_rate, obj.name))
    labels: list[ProjectLabel] = []
    prompt_tools: dict[str, PromptTool] = {}
    seen: set[tuple[str, str, str]] = set()

    def add_labels(control: object, target: str, to_control: str, kind: str) -> None:
        for value, tag in (getattr(control, "labels_attrs", None) or {}).items():
            if not value or (value, target, kind) in seen:  # a label repeated in one shape on one image: first wins
                continue
            seen.add((value, target, kind))
            raw_aliases = (tag.attr or {}).get("predicted_values") or ""
            aliases = tuple(a.strip() for a in str(raw_aliases).split(",") if a.strip())
            labels.append(ProjectLabel(value, to_control, target, aliases, kind))

    masked: dict[str, set[str]] = collections.defaultdict(set)  # image -> labels of its brush/polygon/ellipse
    for control in interface.controls:
        if control.tag in SHAPE_TAGS and control.tag != "RectangleLabels":
            for name in control.to_name or []:
                masked[name] |= {value for value in (getattr(control, "labels_attrs", None) or {}) if value}
    for control in interface.controls:
        targets = [name for name in (control.to_name or []) if name in images]
        if targets:
            if control.tag in PROMPT_TAGS and not images[targets[0]].sequence:
                prompt_tools[control.name] = PromptTool(control.name, PROMPT_TAGS[control.tag], targets[0])
            prompt_only = not images[targets[0]].sequence and _prompt_only(control, masked[targets[0]])
            if control.tag in SHAPE_TAGS and not prompt_only:
                add_labels(control, targets[0], control.name, SHAPE_TAGS[control.tag])
        video_targets = [name for name in (control.to_name or []) if name in videos]
        if control.tag == "Labels" and video_targets:
            boxes = [
                c.name
                for c in interface.controls
                if c.tag == "VideoRectangle" and video_targets[0] in (c.to_name or [])
            ]
            if boxes:
                add_labels(control, video_targets[0], boxes[0], "videorectangle")
    if not labels:
        raise LabelConfigError(
            "the label config has no <BrushLabels>, <PolygonLabels>, <RectangleLabels> or <EllipseLabels> with "
            "labels bound to an <Image> whose value is a task field ($name), nor a <Video> with a <VideoRectangle> "
            f"and <Labels>. usam predicts regions of those shapes and video tracks; for example: {EXAMPLE}"
        )
    used = {label.image for label in labels}
    if used & set(videos) and used - set(videos):
        raise LabelConfigError(
            "the label config labels both a <Video> and images: usam predicts a project's video tracks in jobs and "
            "its images in /predict, one kind per project. Make one project for the videos and one for the images"
        )
    return LabelConfig(
        labels=tuple(labels),
        images={name: image for name, image in images.items() if name in used},
        prompt_tools={name: tool for name, tool in prompt_tools.items() if tool.image in used},
        digest=hashlib.sha256(xml.encode()).hexdigest()[:16],
        videos={name: video for name, video in videos.items() if name in used},
    )


def _prompt_only(control: object, masked_labels: set[str]) -> bool:
    """A ``<RectangleLabels>`` on an image that a brush, polygon or ellipse control labels, and
    either marked ``smart`` or carrying only labels of that control: a prompt tool for that shape,
    not a shape to predict."""
    if getattr(control, "tag", "") != "RectangleLabels" or not masked_labels:
        return False
    attrs = {str(k).lower(): str(v).lower() for k, v in (getattr(control, "attr", None) or {}).items()}
    labels = {value for value in (getattr(control, "labels_attrs", None) or {}) if value}
    return "true" in (attrs.get("smart"), attrs.get("smartonly")) or labels <= masked_labels


def _frame_rate(raw: object, name: str) -> float:
    if raw is None or raw == "":
        return DEFAULT_FPS
    try:
        rate = float(str(raw))
    except ValueError:
        raise LabelConfigError(f'<Video name="{name}"> has frameRate {str(raw)[:20]!r}: not a number') from None
    if not 0 < rate <= 1000:
        raise LabelConfigError(f'<Video name="{name}"> has frameRate {rate:g}: give frames per second (1-1000)')
    return rate
