"""The one settings object: read from the environment once, passed explicitly below that.

Every setting has exactly one environment name, used unchanged in the README and docker-compose.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usam_backend.core.errors import ConfigurationError

SAM_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t", "tiny")
DATA_SOURCES = ("auto", "synthetic", "web", "folder")
REFINE_MODES = ("off", "local", "global", "both")
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usam"


def _env(name: str, doc: str, *, secret: bool = False, **kwargs: Any) -> Any:
    return field(metadata={"env": name, "doc": doc}, repr=not secret, **kwargs)


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Build it with :meth:`from_env`; override with :meth:`replace`."""

    sam_type: str = _env(
        "USAM_SAM_TYPE",
        "SAM model: vit_h, vit_l, vit_b, vit_t (MobileSAM) or tiny (random, tests only)",
        default="vit_t",
    )
    sam_checkpoint: Path | None = _env(
        "USAM_SAM_CHECKPOINT",
        "path to the SAM checkpoint; unset: download the official one into the cache",
        default=None,
    )
    device: str = _env("USAM_DEVICE", f"torch device: {DEVICES_HELP}", default="auto")
    points: int = _env("USAM_POINTS", "grid points per image (a perfect square: 100 = 10x10)", default=100)
    score_threshold: float = _env(
        "USAM_SCORE_THRESHOLD", "keep a grid point when its class probability is at least this", default=0.5
    )
    nms_iou: float = _env("USAM_NMS_IOU", "drop a mask overlapping a better one by more than this IoU", default=0.5)
    refine: str = _env(
        "USAM_REFINE",
        "refine predicted regions with SAM before sending them (UO-SAM): off, local, global or both",
        default="off",
    )
    decode_chunk: int = _env(
        "USAM_DECODE_CHUNK",
        "grid points decoded per batch; 0: on CPU as many as keep their image tokens within 16 MiB (4 for SAM), "
        "64 on CUDA",
        default=0,
    )
    runtime: str = _env(
        "USAM_RUNTIME",
        "runtime of SAM's image encoder and prompt decoder: auto (onnxruntime on CPU, torch on CUDA and for tiny), "
        "torch, onnxruntime or openvino",
        default="auto",
    )
    cache_dir: Path = _env(
        "USAM_CACHE_DIR",
        "checkpoints and cached embeddings (default ~/.cache/usam)",
        default_factory=_default_cache_dir,
    )
    model_dir: Path = _env("USAM_MODEL_DIR", "where trained heads are kept", default=Path("models"))
    embedding_cache_size: int = _env(
        "USAM_EMBEDDING_CACHE_SIZE", "image embeddings kept in memory (0 disables)", default=16
    )
    embedding_cache_disk: bool = _env(
        "USAM_EMBEDDING_CACHE_DISK", "also keep image embeddings on disk under the cache dir", default=False
    )
    max_image_pixels: int = _env(
        "USAM_MAX_IMAGE_PIXELS", "larger images are refused (decompression bombs)", default=50_000_000
    )
    max_image_bytes: int = _env("USAM_MAX_IMAGE_BYTES", "larger task image downloads are refused", default=50_000_000)
    max_video_bytes: int = _env(
        "USAM_MAX_VIDEO_BYTES",
        "larger task video downloads are refused (Label Studio's upload cap)",
        default=262_144_000,
    )
    fetch_timeout: float = _env(
        "USAM_FETCH_TIMEOUT", "seconds a whole task image or video download may take", default=20.0
    )
    label_studio_url: str | None = _env(
        "LABEL_STUDIO_URL",
        "Label Studio's URL (task images, API); unset: the hostname a trusted /setup sends, with its own token",
        default=None,
    )
    label_studio_api_key: str | None = _env(
        "LABEL_STUDIO_API_KEY",
        "legacy token or personal access token; sent to LABEL_STUDIO_URL only",
        default=None,
        secret=True,
    )
    allowed_hosts: tuple[str, ...] = _env(
        "USAM_ALLOWED_HOSTS", "comma-separated hosts besides Label Studio's that task images may come from "
        "(*.example.com matches subdomains)", default=(),
    )  # fmt: skip
    basic_auth_user: str | None = _env(
        "BASIC_AUTH_USER", "require HTTP basic auth on every route but /ping (/webhook: it or the secret)", default=None
    )
    basic_auth_pass: str | None = _env("BASIC_AUTH_PASS", "password for BASIC_AUTH_USER", default=None, secret=True)
    webhook_secret: str | None = _env(
        "USAM_WEBHOOK_SECRET", "if set, /webhook requires header X-Usam-Webhook-Secret with this value (or basic auth)",
        default=None, secret=True,
    )  # fmt: skip
    auto_train: bool = _env(
        "USAM_AUTO_TRAIN",
        "train a head when a project's labels have none; false: only on Start training",
        default=True,
    )
    retrain_every: int = _env(
        "USAM_RETRAIN_EVERY",
        "retrain a project's head on its annotations after this many new ones (0: only on Start training)",
        default=10,
    )
    feedback_iou: float = _env(
        "USAM_FEEDBACK_IOU",
        "a grid point learns an annotated region's label when its SAM mask overlaps the region by this IoU; "
        "predicted and annotated regions match at this mask IoU, video tracks at this track IoU",
        default=0.5,
    )
    predict_budget: float = _env(
        "USAM_PREDICT_BUDGET",
        "seconds a /predict batch may take (Label Studio waits 100); the rest goes to preannotate jobs",
        default=75.0,
    )
    keep_project_heads: int = _env(
        "USAM_KEEP_PROJECT_HEADS",
        "heads trained on a project's annotations kept per project (older ones are deleted; never the serving one)",
        default=3,
    )
    max_pending_predictions: int = _env(
        "USAM_MAX_PENDING_PREDICTIONS",
        "/predict calls in flight at once (one computes, the rest wait); one more gets 503 with Retry-After",
        default=8,
    )
    preannotate_chunk: int = _env("USAM_PREANNOTATE_CHUNK", "tasks per batch pre-annotation job", default=25)
    video_stride: int = _env(
        "USAM_VIDEO_STRIDE",
        "the head runs on every N-th frame of a video; tracks link those frames, boxes are interpolated between",
        default=5,
    )
    video_max_frames: int = _env(
        "USAM_VIDEO_MAX_FRAMES",
        "a video (usam video, Label Studio video tasks) with more frames is refused",
        default=3000,
    )
    sequence_max_frames: int = _env(
        "USAM_SEQUENCE_MAX_FRAMES",
        "a frame-sequence task with more frames gets no prediction (sequences are predicted within /predict)",
        default=200,
    )
    video_chunk: int = _env(
        "USAM_VIDEO_CHUNK", "frames per video job: a longer video is split over several workers", default=240
    )
    redis_url: str | None = _env(
        "REDIS_URL", "train on RQ workers through this Redis; unset: train inside the server process", default=None
    )
    queue: str = _env("USAM_QUEUE", "RQ queue of training jobs", default="usam-train")
    job_timeout: int = _env(
        "USAM_JOB_TIMEOUT",
        "seconds a job may run (in-process jobs stop at their next progress report)",
        default=6 * 3600,
    )
    data_source: str = _env(
        "USAM_DATA_SOURCE",
        "where class images come from: synthetic, web, folder; auto: synthetic with CUDA, else web",
        default="auto",
    )
    data_dir: Path | None = _env("USAM_DATA_DIR", "the folder source: USAM_DATA_DIR/<label>/*.jpg", default=None)
    images_per_class: int = _env(
        "USAM_IMAGES_PER_CLASS", "class images to use; 0: 200 synthetic, 45 web, all in a folder", default=0
    )
    seed: int = _env("USAM_SEED", "seed for image generation and training", default=0)
    train_epochs: int = _env("USAM_TRAIN_EPOCHS", "epochs for the teacher and again for the student", default=40)
    sd_model: str = _env(
        "USAM_SD_MODEL",
        "Stable Diffusion model (hub id or local folder); fast: stabilityai/sd-turbo",
        default="CompVis/stable-diffusion-v1-4",
    )
    sd_steps: int = _env("USAM_SD_STEPS", "denoising steps (sd-turbo: 1)", default=50)
    sd_guidance: float = _env("USAM_SD_GUIDANCE", "classifier-free guidance scale (sd-turbo: 0)", default=7.5)
    sd_size: int = _env("USAM_SD_SIZE", "generated image side in pixels", default=512)
    sd_batch: int = _env("USAM_SD_BATCH", "images generated per batch", default=4)
    prompt_template: str = _env(
        "USAM_PROMPT_TEMPLATE", "text prompt for a class; {label} is replaced", default="a photo of a {label}"
    )
    openverse_url: str = _env("USAM_OPENVERSE_URL", "Openverse API base URL", default="https://api.openverse.org")
    commons_url: str = _env(
        "USAM_COMMONS_URL", "Wikimedia Commons API URL", default="https://commons.wikimedia.org/w/api.php"
    )
    web_licenses: str = _env(
        "USAM_WEB_LICENSES", "Openverse licences to accept (comma-separated)", default="cc0,pdm,by,by-sa"
    )
    web_min_side: int = _env("USAM_WEB_MIN_SIDE", "web images with a shorter side are dropped", default=128)
    web_interval: float = _env("USAM_WEB_INTERVAL", "seconds between requests to one image API", default=1.0)

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``USAM_*`` variable that is set; the rest keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, raw.strip())
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (CLI flags); ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.points)

    def _check(self) -> None:
        if self.sam_type not in SAM_TYPES:
            raise _bad("sam_type", self.sam_type, f"one of {', '.join(SAM_TYPES)}")
        side = math.isqrt(self.points) if self.points > 0 else 0
        if self.points < 1 or side * side != self.points:
            near = sorted({max(1, side) ** 2, (side + 1) ** 2})
            raise _bad("points", self.points, f"a perfect square such as {' or '.join(map(str, near))}")
        for name in ("score_threshold", "nms_iou", "feedback_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise _bad(name, value, "a number between 0 and 1")
        if self.refine not in REFINE_MODES:
            raise _bad("refine", self.refine, f"one of {', '.join(REFINE_MODES)}")
        if self.runtime not in RUNTIMES:
            raise _bad("runtime", self.runtime, f"one of {', '.join(RUNTIMES)}")
        if self.decode_chunk < 0:
            raise _bad("decode_chunk", self.decode_chunk, "0 (automatic) or a positive number")
        if self.embedding_cache_size < 0:
            raise _bad("embedding_cache_size", self.embedding_cache_size, "0 or more")
        if self.max_image_pixels < 1:
            raise _bad("max_image_pixels", self.max_image_pixels, "a positive number of pixels")
        for name in ("max_image_bytes", "max_video_bytes"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "a positive number of bytes")
        if self.fetch_timeout <= 0:
            raise _bad("fetch_timeout", self.fetch_timeout, "a positive number of seconds")
        if self.data_source not in DATA_SOURCES:
            raise _bad("data_source", self.data_source, f"one of {', '.join(DATA_SOURCES)}")
        if "{label}" not in self.prompt_template:
            raise _bad("prompt_template", self.prompt_template, "a text containing {label}")
        for name in ("images_per_class", "sd_steps", "sd_size", "sd_batch", "train_epochs", "job_timeout"):
            if getattr(self, name) < (0 if name == "images_per_class" else 1):
                raise _bad(
                    name, getattr(self, name), "a positive number" if name != "images_per_class" else "0 or more"
                )
        if self.retrain_every < 0:
            raise _bad("retrain_every", self.retrain_every, "0 (off) or a positive number of annotations")
        if self.predict_budget <= 0:
            raise _bad("predict_budget", self.predict_budget, "a positive number of seconds")
        if self.keep_project_heads < 1:
            raise _bad("keep_project_heads", self.keep_project_heads, "a positive number of heads")
        if self.max_pending_predictions < 1:
            raise _bad("max_pending_predictions", self.max_pending_predictions, "a positive number of requests")
        for name in ("video_stride", "video_max_frames", "video_chunk", "sequence_max_frames"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "a positive number of frames")
        if self.preannotate_chunk < 1:
            raise _bad("preannotate_chunk", self.preannotate_chunk, "a positive number of tasks")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigurationError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise _bad("device", dev, DEVICES_HELP)


def env_name(field_name: str) -> str:
    """The environment variable behind a settings field."""
    return str(_FIELDS[field_name].metadata["env"])


def documented_settings() -> list[tuple[str, str, str]]:
    """(environment name, default, description) for every setting, in declaration order."""
    defaults = Settings()
    rows = []
    for f in dataclasses.fields(Settings):
        value = getattr(defaults, f.name)
        if value is None or value == ():
            shown = "unset"
        else:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
        if f.name == "cache_dir":
            shown = "~/.cache/usam"
        rows.append((f.metadata["env"], shown, f.metadata["doc"]))
    return rows


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "Path": lambda raw: Path(raw).expanduser(),
    "Path | None": lambda raw: Path(raw).expanduser(),
    "str": str,
    "str | None": str,
    "tuple[str, ...]": lambda raw: tuple(part.strip() for part in raw.split(",") if part.strip()),
}


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    try:
        return _PARSERS[str(f.type)](raw)
    except ValueError as exc:
        raise ConfigurationError(f"{f.metadata['env']}={raw!r} is not valid: {exc}") from None


def _bad(field_name: str, value: object, expected: str) -> ConfigurationError:
    return ConfigurationError(f"{env_name(field_name)}={value!r} is not valid: expected {expected}")
