"""The SAM engine: one encoder pass per image, point grids decoded in chunks, masks on demand."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide

from usam_backend.core.settings import Settings
from usam_backend.sam.cache import EmbeddingCache, ImageEmbedding, image_key
from usam_backend.sam.decoder import (
    MULTIMASK,
    DecodedPoints,
    PointDecoder,
    PromptMaskDecoder,
    low_res_logits,
    reference_decode,
)
from usam_backend.sam.models import LoadedSam, load_sam
from usam_backend.sam.runtime import ENCODER, PROMPT_DECODER, ModuleRuntime

CPU_CHUNK_BYTES = 16 * 2**20
"""On CPU, points decoded at once: as many as keep one (points, h * w, E) float32 tensor of image
tokens within 16 MiB (4 points for SAM's 64x64x256 embedding). The decoder makes a few of them per
chunk; glibc maps allocations over its 32 MiB ceiling afresh each time, and those page faults cost
a third of the decoder's time at 8 points. Under the ceiling the freed blocks are reused."""
UPSCALE_BATCH = 8
UPSCALE_PIXELS = 16_000_000
"""Masks brought to image size at once: at most UPSCALE_BATCH, and at most UPSCALE_PIXELS pixels
(float32 logits) in all, which bounds the memory for very large images."""


@dataclass
class PointChunk:
    """A chunk of grid points and their decoding.

    Attributes:
        index: positions of these points in the grid.
        points: (b, 2) float32 XY of the points in original image pixels.
        decoded: transformer outputs (tokens, IoU predictions, image tokens for masks).
    """

    index: slice
    points: np.ndarray
    decoded: DecodedPoints


@dataclass(frozen=True)
class PromptBatch:
    """Masks for B prompts on one image, K per prompt (3 with multimask, else 1).

    Attributes:
        masks: (B, K, H, W) bool at the original image size (None when not asked for).
        iou_predictions: (B, K) float32 SAM's predicted IoU of each mask.
        low_res_logits: (B, K, 256, 256) mask logits, usable as the next pass's ``mask_input``.
    """

    masks: np.ndarray | None
    iou_predictions: np.ndarray
    low_res_logits: torch.Tensor


@dataclass(frozen=True)
class PromptResult:
    """Masks for one prompt: (3, H, W) bool multimask outputs (or (1, H, W)), SAM IoU scores."""

    masks: np.ndarray
    iou_predictions: np.ndarray
    low_res_logits: torch.Tensor


class SamEngine:
    """Wraps a loaded SAM model with the caching and batching usam's inference needs."""

    def __init__(
        self,
        sam: LoadedSam,
        *,
        cache: EmbeddingCache | None = None,
        decode_chunk: int = 0,
        runtime: str = "torch",
        cache_dir: Path | None = None,
    ):
        """
        Args:
            runtime: ``USAM_RUNTIME`` for the image encoder and the prompt decoder (see
                :mod:`usam_backend.sam.runtime`); exported parts are kept under ``cache_dir``.
        """
        self.sam = sam
        self.model = sam.model
        self.cache = cache if cache is not None else EmbeddingCache(capacity=16)
        if not decode_chunk:
            height, width = self.model.prompt_encoder.image_embedding_size
            per_point = height * width * self.model.prompt_encoder.embed_dim * 4
            decode_chunk = 64 if sam.device.type == "cuda" else max(1, CPU_CHUNK_BYTES // per_point)
        self.decode_chunk = decode_chunk
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        if runtime != "torch" and cache_dir is None:
            raise ValueError(f"runtime {runtime!r} needs a cache_dir for the exported encoder and decoder")
        keep = not sam.weights.startswith("random (no checkpoint")  # unseeded: no later process has them
        self.encoder = ModuleRuntime(
            self.model.image_encoder, ENCODER, runtime, sam.device, sam.sam_type, cache_dir or Path("."),
            sam.fingerprint, keep=keep,
        )  # fmt: skip
        decoder = self.model.mask_decoder
        with torch.no_grad():
            image_pe = self.model.prompt_encoder.get_dense_pe()

        def sams_decoder(features: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return decoder.predict_masks(features, image_pe, sparse, dense)

        self.prompt_decoder = ModuleRuntime(
            PromptMaskDecoder(decoder, image_pe), PROMPT_DECODER, runtime, sam.device, sam.sam_type,
            cache_dir or Path("."), sam.fingerprint, keep=keep, eager=sams_decoder,
        )  # fmt: skip
        """SAM's mask decoder for prompts: (features, sparse, dense) -> all four masks' low-res logits
        and predicted IoU (the multimask choice is the caller's). In PyTorch, SAM's own decoder."""
        self.encoder_calls = 0
        self._encode_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, allow_random: bool = False) -> SamEngine:
        sam = load_sam(
            settings.sam_type, settings.sam_checkpoint, settings.cache_dir, settings.device, allow_random=allow_random
        )
        disk = settings.cache_dir / "embeddings" / sam.fingerprint if settings.embedding_cache_disk else None
        cache = EmbeddingCache(settings.embedding_cache_size, disk)
        return cls(
            sam, cache=cache, decode_chunk=settings.decode_chunk, runtime=settings.runtime, cache_dir=settings.cache_dir
        )

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def embedding_dim(self) -> int:
        return self.sam.embedding_dim

    # -- image encoder -------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, image: np.ndarray, *, use_cache: bool = True) -> ImageEmbedding:
        """Encode an HxWx3 uint8 RGB image, or return its cached embedding."""
        key = image_key(image, self.sam.fingerprint)
        if use_cache and (found := self.cache.get(key, self.device)) is not None:
            return found
        resized = self.transform.apply_image(image)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).unsqueeze(0).float()
        with self._encode_lock:  # one encoder pass at a time: it is the memory peak
            (features,) = self.encoder(self.model.preprocess(pixels))
            features = features.to(self.device)
            self.encoder_calls += 1
        embedding = ImageEmbedding(
            features=features,
            original_size=(int(image.shape[0]), int(image.shape[1])),
            input_size=(int(resized.shape[0]), int(resized.shape[1])),
            key=key,
        )
        if use_cache:
            self.cache.put(embedding)
        return embedding

    # -- point grids ---------------------------------------------------------------------------

    @staticmethod
    def grid_points(original_size: tuple[int, int], points: int) -> np.ndarray:
        """A uniform ``sqrt(points)`` x ``sqrt(points)`` grid, (points, 2) float32 XY in pixels."""
        side = round(points**0.5)
        height, width = original_size
        return (build_point_grid(side) * np.array([width, height])).astype(np.float32)

    @torch.inference_mode()
    def decode(self, embedding: ImageEmbedding, points: np.ndarray, chunk: int | None = None) -> Iterator[PointChunk]:
        """Decode point prompts chunk by chunk: mask tokens and IoU predictions, masks on demand.

        Args:
            points: (d, 2) XY in original image pixels, each a positive point prompt.
        """
        chunk = chunk or self.decode_chunk
        decoder = self.point_decoder(embedding)
        for start in range(0, len(points), chunk):
            index = slice(start, min(start + chunk, len(points)))
            sparse = self._sparse_prompts(points[index], embedding.original_size)
            yield PointChunk(index, points[index], decoder.decode(sparse))

    @torch.inference_mode()
    def point_decoder(self, embedding: ImageEmbedding) -> PointDecoder:
        """The decoder for point prompts on ``embedding``, its per-image work done once."""
        prompt_encoder = self.model.prompt_encoder
        return PointDecoder(
            self.model.mask_decoder,
            embedding.features,
            prompt_encoder.get_dense_pe(),
            prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1),
        )

    @torch.inference_mode()
    def point_masks(
        self,
        embedding: ImageEmbedding,
        points: np.ndarray,
        iou_threshold: float = 0.0,
        decoder: PointDecoder | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's three masks for (B, 2) single positive points (XY pixels of the image), as its
        decoder's multimask output, made only for the points with a predicted IoU over
        ``iou_threshold``: their (k,) indices, (k, 3, 256, 256) low-res logits, (k, 3) predicted IoU.
        The points are decoded ``decode_chunk`` at a time."""
        decoder = decoder or self.point_decoder(embedding)
        size = self.model.prompt_encoder.image_embedding_size
        points = np.asarray(points, dtype=np.float32)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(points), self.decode_chunk):
            sparse = self._sparse_prompts(points[start : start + self.decode_chunk], embedding.original_size)
            decoded = decoder.decode(sparse)
            rows = torch.nonzero((decoded.iou_predictions > iou_threshold).any(dim=1)).squeeze(1)
            logits = low_res_logits(self.model.mask_decoder, decoded, rows, size)
            found.append((rows + start, logits, decoded.iou_predictions[rows]))
        if not found:
            empty = torch.zeros(0, 3, 4 * size[0], 4 * size[1], device=self.device)
            return torch.zeros(0, dtype=torch.long, device=self.device), empty, torch.zeros(0, 3, device=self.device)
        rows, logits, iou = (torch.cat(parts) for parts in zip(*found, strict=True))
        return rows, logits, iou

    @torch.inference_mode()
    def point_embeddings(self, image: np.ndarray, points: int, *, use_cache: bool = True) -> np.ndarray:
        """The (points, D) float32 mask-token embeddings of a grid on ``image`` (the training path)."""
        embedding = self.embed(image, use_cache=use_cache)
        grid = self.grid_points(embedding.original_size, points)
        tokens = [chunk.decoded.tokens for chunk in self.decode(embedding, grid)]
        return torch.cat(tokens).float().cpu().numpy()

    @torch.inference_mode()
    def low_res_logits(self, chunk: PointChunk, index: torch.Tensor) -> torch.Tensor:
        """(k, 3, 256, 256) multimask logits for points ``index`` of ``chunk``."""
        height, width = self.model.prompt_encoder.image_embedding_size
        return low_res_logits(self.model.mask_decoder, chunk.decoded, index, (height, width))

    @torch.inference_mode()
    def upscale(self, logits: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """Low-res logits (k, 256, 256) -> (k, H, W) bool masks at the original image size."""
        masks = []
        height, width = embedding.original_size
        step = max(1, min(UPSCALE_BATCH, UPSCALE_PIXELS // max(1, height * width)))
        for start in range(0, logits.shape[0], step):
            batch = logits[start : start + step, None]
            full = self.model.postprocess_masks(batch, embedding.input_size, embedding.original_size)
            masks.append((full[:, 0] > self.model.mask_threshold).cpu().numpy())
        if not masks:
            return np.zeros((0, *embedding.original_size), dtype=bool)
        return np.concatenate(masks)

    @torch.inference_mode()
    def upscale_logits(self, logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Low-res logits (k, 256, 256) -> (k, H, W) float logits at the original image size."""
        return self.model.postprocess_masks(logits[:, None], embedding.input_size, embedding.original_size)[:, 0]

    # -- SAM's own decoder (reference path, prompts) -------------------------------------------

    @torch.inference_mode()
    def reference_decode(
        self, embedding: ImageEmbedding, points: np.ndarray, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's decoder forward over all points in batches of ``batch``, masks included.

        Returns:
            tokens (d, 4E), iou_predictions (d, 3), low_res_logits (d, 3, 256, 256).
        """
        outputs = []
        pe = self.model.prompt_encoder.get_dense_pe()
        for start in range(0, len(points), batch):
            coords, labels = self._point_tensors(points[start : start + batch], embedding.original_size)
            sparse, dense = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            outputs.append(reference_decode(self.model.mask_decoder, embedding.features, pe, sparse, dense))
        tokens, iou, logits = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        return tokens, iou, logits

    @torch.inference_mode()
    def predict_prompts(
        self,
        embedding: ImageEmbedding,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        multimask: bool = True,
        masks: bool = True,
    ) -> PromptBatch:
        """SAM's decoder for a batch of prompts on one image, reusing its embedding.

        The one prompt API interactive tools, refinement and video use. Give any of:

        Args:
            points: (B, N, 2) XY pixels of the original image; labels: (B, N), 1 positive, 0 negative.
            boxes: (B, 4) XYXY pixels.
            mask_input: (B, 1, 256, 256) low-res logits of an earlier pass (SAM's cascade).
            multimask: three masks per prompt (K = 3) instead of one (K = 1).
            masks: also upscale the masks to the image (else only logits and scores).
        """
        sizes = {len(x) for x in (points, boxes, mask_input) if x is not None}
        if not sizes:
            raise ValueError("a prompt needs points, boxes or mask_input")
        if len(sizes) > 1:
            raise ValueError(f"points, boxes and mask_input must hold the same number of prompts, got {sorted(sizes)}")
        point_input = None
        if points is not None:
            if labels is None or np.shape(labels) != np.shape(points)[:2]:
                raise ValueError(f"labels must be (B, N) for points of shape {np.shape(points)}")
            coords = self.transform.apply_coords(np.asarray(points, dtype=np.float32), embedding.original_size)
            point_input = (
                torch.as_tensor(coords, dtype=torch.float32, device=self.device),
                torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=self.device),
            )
        box_input = None
        if boxes is not None:
            scaled = self.transform.apply_boxes(np.asarray(boxes, dtype=np.float32), embedding.original_size)
            box_input = torch.as_tensor(scaled, dtype=torch.float32, device=self.device)
        mask_tensor = None
        if mask_input is not None:
            mask_tensor = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device)
        if not sizes.pop():  # no prompts: no masks (SAM's decoder cannot shape an empty batch)
            height, width = self.model.prompt_encoder.image_embedding_size
            k = 3 if multimask else 1
            return PromptBatch(
                np.zeros((0, k, *embedding.original_size), dtype=bool) if masks else None,
                np.zeros((0, k), dtype=np.float32),
                torch.zeros(0, k, 4 * height, 4 * width, device=self.device),
            )
        sparse, dense = self.model.prompt_encoder(points=point_input, boxes=box_input, masks=mask_tensor)
        if mask_tensor is None:
            dense = dense[:1]  # the same no-mask embedding for every prompt: broadcast, not copied
        all_masks, all_iou = self.prompt_decoder(embedding.features, sparse, dense)
        chosen = MULTIMASK if multimask else slice(0, 1)  # as SAM's MaskDecoder.forward
        low_res, iou = all_masks[:, chosen].to(self.device), all_iou[:, chosen].to(self.device)
        full = None
        if masks:
            b, k = low_res.shape[:2]
            full = self.upscale(low_res.reshape(b * k, *low_res.shape[2:]), embedding)
            full = full.reshape(b, k, *full.shape[1:])
        return PromptBatch(full, iou.float().cpu().numpy(), low_res)

    @torch.inference_mode()
    def predict_prompt(
        self,
        embedding: ImageEmbedding,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        multimask: bool = True,
    ) -> PromptResult:
        """Masks for one interactive prompt: :meth:`predict_prompts` with a batch of one.

        Args:
            points: (n, 2) XY pixels; labels: (n,) 1 = positive, 0 = negative.
            box: (4,) XYXY pixels.
        """
        has_points = points is not None and len(points) > 0
        batch = self.predict_prompts(
            embedding,
            points=np.asarray(points, dtype=np.float32)[None] if has_points else None,
            labels=np.asarray(labels)[None] if has_points else None,
            boxes=None if box is None else np.asarray(box, dtype=np.float32)[None],
            multimask=multimask,
        )
        assert batch.masks is not None
        return PromptResult(batch.masks[0], batch.iou_predictions[0], batch.low_res_logits[0])

    def _point_tensors(self, points: np.ndarray, original_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.transform.apply_coords(points, original_size)
        coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[:, None, :]
        labels = torch.ones(coords_t.shape[:2], dtype=torch.int64, device=self.device)
        return coords_t, labels

    def _sparse_prompts(self, points: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        coords, labels = self._point_tensors(points, original_size)
        sparse, _dense = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return sparse
