"""usam: Segment Anything that knows your labels — a Label Studio ML backend and a library.

The stable Python API (imported lazily: ``import usam_backend`` loads no model and no torch)::

    from usam_backend import Settings, SamEngine, SemanticSegmenter, load_image
    from training import Head

    settings = Settings.from_env()                       # USAM_* variables, read once
    engine = SamEngine.from_settings(settings)           # SAM, weights downloaded and verified once
    segmenter = SemanticSegmenter(engine, Head.load("models/heads/animals.pt"))
    regions = segmenter.segment(load_image("photo.jpg"))  # Regions: masks, labels, scores
    predictor = EnginePredictor(engine)                  # SamPredictor's interface, cached embeddings

Layers, each importing only those below it: ``core`` (settings, images, masks, the result
container) < ``sam`` (models, engine, prompt API) < ``training`` (builds heads) < ``systems``
(semantic inference, interactive prompts) and ``registry`` (heads on disk) < ``labelstudio``
(the protocol's pieces) < ``jobs`` (runners, job functions, policy) < ``server`` (HTTP) <
``tools`` and ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usam_backend.core.lazy import lazy_exports

if TYPE_CHECKING:
    from usam_backend.core.errors import (
        CheckpointError,
        ConfigurationError,
        DataError,
        HeadError,
        ImageError,
        UsamError,
    )
    from usam_backend.core.images import load_image
    from usam_backend.core.regions import Region, Regions
    from usam_backend.core.settings import Settings, get_settings
    from usam_backend.core.shapes import mask_ellipse, mask_polygons, polygons_mask
    from usam_backend.core.video import Clip, VideoError, read_clip, write_video
    from usam_backend.registry import HeadRegistry, model_version
    from usam_backend.sam.engine import PromptBatch, PromptResult, SamEngine
    from usam_backend.sam.generator import AutomaticMasks
    from usam_backend.sam.models import LoadedSam, load_sam
    from usam_backend.sam.predictor import EnginePredictor
    from usam_backend.sam.shared import shared_engine
    from usam_backend.systems.prompts import PromptMask, segment_prompt
    from usam_backend.systems.uosam import RefineOptions, RefineReport, refine_masks
    from usam_backend.systems.usam import SemanticSegmenter
    from usam_backend.systems.uvosam import (
        Track,
        follow_object,
        head_detector,
        segment_video,
        track_boxes,
        video_objects,
    )

_EXPORTS = {
    "Settings": "usam_backend.core.settings",
    "get_settings": "usam_backend.core.settings",
    "UsamError": "usam_backend.core.errors",
    "ConfigurationError": "usam_backend.core.errors",
    "ImageError": "usam_backend.core.errors",
    "CheckpointError": "usam_backend.core.errors",
    "HeadError": "usam_backend.core.errors",
    "DataError": "usam_backend.core.errors",
    "load_image": "usam_backend.core.images",
    "mask_polygons": "usam_backend.core.shapes",
    "polygons_mask": "usam_backend.core.shapes",
    "mask_ellipse": "usam_backend.core.shapes",
    "AutomaticMasks": "usam_backend.sam.generator",
    "read_clip": "usam_backend.core.video",
    "write_video": "usam_backend.core.video",
    "Clip": "usam_backend.core.video",
    "VideoError": "usam_backend.core.video",
    "track_boxes": "usam_backend.systems.uvosam",
    "segment_video": "usam_backend.systems.uvosam",
    "follow_object": "usam_backend.systems.uvosam",
    "Track": "usam_backend.systems.uvosam",
    "video_objects": "usam_backend.systems.uvosam",
    "head_detector": "usam_backend.systems.uvosam",
    "Regions": "usam_backend.core.regions",
    "Region": "usam_backend.core.regions",
    "load_sam": "usam_backend.sam.models",
    "LoadedSam": "usam_backend.sam.models",
    "SamEngine": "usam_backend.sam.engine",
    "PromptBatch": "usam_backend.sam.engine",
    "PromptResult": "usam_backend.sam.engine",
    "EnginePredictor": "usam_backend.sam.predictor",
    "shared_engine": "usam_backend.sam.shared",
    "SemanticSegmenter": "usam_backend.systems.usam",
    "segment_prompt": "usam_backend.systems.prompts",
    "refine_masks": "usam_backend.systems.uosam",
    "RefineOptions": "usam_backend.systems.uosam",
    "RefineReport": "usam_backend.systems.uosam",
    "PromptMask": "usam_backend.systems.prompts",
    "HeadRegistry": "usam_backend.registry",
    "model_version": "usam_backend.registry",
}

__all__ = [
    "AutomaticMasks",
    "CheckpointError",
    "Clip",
    "ConfigurationError",
    "DataError",
    "EnginePredictor",
    "HeadError",
    "HeadRegistry",
    "ImageError",
    "LoadedSam",
    "PromptBatch",
    "PromptMask",
    "PromptResult",
    "RefineOptions",
    "RefineReport",
    "Region",
    "Regions",
    "SamEngine",
    "SemanticSegmenter",
    "Settings",
    "Track",
    "UsamError",
    "VideoError",
    "follow_object",
    "get_settings",
    "head_detector",
    "load_image",
    "load_sam",
    "mask_ellipse",
    "mask_polygons",
    "model_version",
    "polygons_mask",
    "read_clip",
    "refine_masks",
    "segment_prompt",
    "segment_video",
    "shared_engine",
    "track_boxes",
    "video_objects",
    "write_video",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
