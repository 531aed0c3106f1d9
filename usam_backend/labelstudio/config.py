"""What a Label Studio label config asks of usam: brush labels on images, and smart prompt tools.

Every ``<BrushLabels>`` bound to an ``<Image>`` is served; a label's ``predicted_values`` are the
model class names that map onto it (label-studio-ml's convention). ``<KeyPointLabels>`` and
``<RectangleLabels>`` on the same image act as prompts for interactive segmentation.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from usam_backend.core.errors import UsamError
from usam_backend.core.labels import normalise

MAX_LABEL_CONFIG_BYTES = 1_000_000
PROMPT_TAGS = {"KeyPointLabels": "keypointlabels", "RectangleLabels": "rectanglelabels"}
EXAMPLE = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels></View>'
)


class LabelConfigError(UsamError):
    """The label config is unreadable or asks for nothing usam can predict."""


@dataclass(frozen=True)
class ProjectLabel:
    """A label of a brush control: its value and the model class names that map onto it."""

    value: str
    control: str  # BrushLabels name (from_name)
    image: str  # Image name (to_name)
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Normalised names a head class may carry to serve this label (value first)."""
        return tuple(dict.fromkeys(normalise(n) for n in (self.value, *self.aliases)))


@dataclass(frozen=True)
class ImageField:
    name: str  # the <Image> tag's name (to_name)
    key: str  # the task data key its value refers to ($image -> image)


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

    @property
    def label_values(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(label.value for label in self.labels))

    @property
    def label_set(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Labels with their aliases, order-free: what a head must cover to serve this project."""
        return tuple(sorted({(normalise(label.value), tuple(sorted(label.names))) for label in self.labels}))

    def labels_for_image(self, image: str) -> tuple[ProjectLabel, ...]:
        return tuple(label for label in self.labels if label.image == image)

    def brush_label(self, value: str, image: str) -> ProjectLabel | None:
        """The brush label named ``value`` (by value or alias) on ``image``, for interactive prompts."""
        wanted = normalise(value)
        for label in self.labels_for_image(image):
            if wanted in label.names:
                return label
        return None


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
    images = {
        obj.name: ImageField(obj.name, str(obj.value).lstrip("$"))
        for obj in interface.objects
        if obj.tag == "Image" and str(obj.value).startswith("$")
    }
    labels: list[ProjectLabel] = []
    prompt_tools: dict[str, PromptTool] = {}
    seen: set[tuple[str, str]] = set()
    for control in interface.controls:
        targets = [name for name in (control.to_name or []) if name in images]
        if not targets:
            continue
        if control.tag in PROMPT_TAGS:
            prompt_tools[control.name] = PromptTool(control.name, PROMPT_TAGS[control.tag], targets[0])
        if control.tag != "BrushLabels":
            continue
        for value, tag in (control.labels_attrs or {}).items():
            if not value or (value, targets[0]) in seen:  # a label repeated on one image: first control wins
                continue
            seen.add((value, targets[0]))
            raw_aliases = (tag.attr or {}).get("predicted_values") or ""
            aliases = tuple(a.strip() for a in str(raw_aliases).split(",") if a.strip())
            labels.append(ProjectLabel(value, control.name, targets[0], aliases))
    if not labels:
        raise LabelConfigError(
            "the label config has no <BrushLabels> with labels bound to an <Image> whose value is a task field "
            f"($name). usam predicts brush masks; for example: {EXAMPLE}"
        )
    used_images = {label.image for label in labels}
    return LabelConfig(
        labels=tuple(labels),
        images={name: field for name, field in images.items() if name in used_images},
        prompt_tools={name: tool for name, tool in prompt_tools.items() if tool.image in used_images},
        digest=hashlib.sha256(xml.encode()).hexdigest()[:16],
    )
