"""Building SAM models by type: the official sizes, MobileSAM, and a tiny random one for tests."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from usam_backend.core.errors import CheckpointError, ConfigurationError
from usam_backend.sam.checkpoints import find_checkpoint, resolve_checkpoint

TINY_SEED = 0
TINY_DIM = 64
"""Transformer width of the tiny SAM: its point embeddings have 4 x 64 = 256 dimensions."""


@dataclass(frozen=True)
class LoadedSam:
    """A SAM model in eval mode on its device, and where its weights came from."""

    model: Sam
    sam_type: str
    weights: str  # "random (seed 0)" or the checkpoint path
    device: torch.device

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")

    @property
    def embedding_dim(self) -> int:
        """Length of one point's mask-token embedding: mask tokens x transformer width."""
        decoder = self.model.mask_decoder
        return int(decoder.num_mask_tokens * decoder.transformer_dim)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights, so cached embeddings of other weights are never reused."""
        return weights_fingerprint(self.sam_type, None if self.random_weights else Path(self.weights))


def weights_fingerprint(sam_type: str, checkpoint: Path | None) -> str:
    """``<type>-random`` for random weights, else ``<type>-<file stem>-<file size>``."""
    if checkpoint is None:
        return f"{sam_type}-random"
    return f"{sam_type}-{checkpoint.stem}-{checkpoint.stat().st_size}"


def expected_fingerprint(sam_type: str, checkpoint: Path | None, cache_dir: Path) -> str | None:
    """The fingerprint :func:`load_sam` would give, without loading anything; None when the
    checkpoint is not on disk yet (it will be downloaded on first use)."""
    if sam_type == "tiny":
        return weights_fingerprint(sam_type, None)
    path = find_checkpoint(sam_type, checkpoint, cache_dir)
    return weights_fingerprint(sam_type, path) if path is not None else None


def build_tiny_sam(seed: int = TINY_SEED) -> Sam:
    """A small SAM from the real ``segment_anything`` classes with seeded random weights.

    Same geometry as the real models (1024 input, 64x64 embedding, 256x256 low-res masks), so the
    whole pipeline runs unchanged; it segments nothing meaningful. For tests and demos only.
    """
    image_size, patch = 1024, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=image_size,
                patch_size=patch,
                embed_dim=32,
                depth=2,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=TINY_DIM,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=8,
                global_attn_indexes=(),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=TINY_DIM,
                image_embedding_size=(image_size // patch, image_size // patch),
                input_image_size=(image_size, image_size),
                mask_in_chans=8,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=TINY_DIM, mlp_dim=128, num_heads=4),
                transformer_dim=TINY_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=64,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def build_architecture(sam_type: str) -> Sam:
    """The model of ``sam_type`` with freshly initialised weights."""
    if sam_type == "tiny":
        return build_tiny_sam()
    if sam_type == "vit_t":
        with warnings.catch_warnings():  # timm deprecation noise on import
            warnings.simplefilter("ignore")
            from mobile_sam import sam_model_registry as mobile_registry
        return mobile_registry["vit_t"]().eval()
    from segment_anything import sam_model_registry

    return sam_model_registry[sam_type]().eval()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"USAM_DEVICE={device} but CUDA is not available here; use cpu or auto")
    return resolved


def load_sam(
    sam_type: str,
    checkpoint: Path | None,
    cache_dir: Path,
    device: str = "auto",
    *,
    allow_random: bool = False,
) -> LoadedSam:
    """Build ``sam_type`` and load its weights.

    ``tiny`` always has random weights. Other types load ``checkpoint``, else the cached official
    file, else download it; with ``allow_random`` (benchmarks) they use random weights instead of
    downloading when no checkpoint is on disk.
    """
    torch_device = resolve_device(device)
    model = build_architecture(sam_type)
    if sam_type == "tiny":
        return LoadedSam(model.to(torch_device), sam_type, f"random (seed {TINY_SEED})", torch_device)
    path = find_checkpoint(sam_type, checkpoint, cache_dir)
    if path is None and allow_random:
        return LoadedSam(model.to(torch_device), sam_type, "random (no checkpoint on disk)", torch_device)
    if path is None:
        path = resolve_checkpoint(sam_type, checkpoint, cache_dir)
    _load_weights(model, path, sam_type)
    return LoadedSam(model.to(torch_device), sam_type, str(path), torch_device)


def _load_weights(model: Sam, path: Path, sam_type: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"could not read the SAM checkpoint {path}: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path} is not a {sam_type} checkpoint ({first}); check USAM_SAM_TYPE and USAM_SAM_CHECKPOINT"
        ) from None
