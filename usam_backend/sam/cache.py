"""Image-embedding cache: bounded in memory, optionally persisted on disk.

Keys name the image content and the SAM weights, so a second request for the same pixels skips
the image encoder, and embeddings of other weights are never mixed in.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usam_backend.core.fileio import atomic_path


@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoder pass and the geometry needed to map masks back to the image.

    Attributes:
        features: (1, E, h, w) float32 image embedding, on the engine's device.
        original_size: (H, W) of the image as given.
        input_size: (h, w) of the image resized for the encoder, before padding to a square.
        key: content key of the image and SAM weights.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    key: str


def image_key(image: np.ndarray, fingerprint: str) -> str:
    """Content key of an HxWx3 uint8 image for the SAM weights named by ``fingerprint``."""
    digest = hashlib.sha256()
    digest.update(fingerprint.encode())
    digest.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class EmbeddingCache:
    """Least-recently-used embeddings in memory, and (optionally) every embedding on disk."""

    def __init__(self, capacity: int, disk_dir: Path | None = None):
        self.capacity = capacity
        self.disk_dir = disk_dir
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, device: torch.device) -> ImageEmbedding | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        found = self._read_disk(key, device)
        if found is not None:
            self._remember(found)
        return found

    def put(self, embedding: ImageEmbedding) -> None:
        self._remember(embedding)
        self._write_disk(embedding)

    def __len__(self) -> int:
        return len(self._items)

    def _remember(self, embedding: ImageEmbedding) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[embedding.key] = embedding
            self._items.move_to_end(embedding.key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / key[:2] / f"{key}.pt"

    def _read_disk(self, key: str, device: torch.device) -> ImageEmbedding | None:
        if self.disk_dir is None or not self._path(key).is_file():
            return None
        try:
            saved = torch.load(self._path(key), map_location=device, weights_only=True)
            return ImageEmbedding(
                features=saved["features"],
                original_size=(int(saved["original_size"][0]), int(saved["original_size"][1])),
                input_size=(int(saved["input_size"][0]), int(saved["input_size"][1])),
                key=key,
            )
        except Exception:  # an unreadable cache entry is recomputed, never trusted
            return None

    def _write_disk(self, embedding: ImageEmbedding) -> None:
        if self.disk_dir is None:
            return
        payload = {
            "features": embedding.features.detach().cpu(),
            "original_size": list(embedding.original_size),
            "input_size": list(embedding.input_size),
        }
        with atomic_path(self._path(embedding.key)) as tmp:
            torch.save(payload, tmp)
