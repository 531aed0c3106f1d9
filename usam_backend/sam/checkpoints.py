"""Official SAM checkpoints: where they live, how to fetch them, how to know they are intact."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

from usam_backend.core.errors import CheckpointError
from usam_backend.core.fileio import atomic_path


@dataclass(frozen=True)
class Checkpoint:
    url: str
    md5: str
    size_hint: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# No SHA256 is published for these files; the MD5s are the ones the community verifies against.
CHECKPOINTS: dict[str, Checkpoint] = {
    "vit_h": Checkpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "4b8939a88964f0f4ff5f5b2642c598a6",
        "2.56 GB",
    ),
    "vit_l": Checkpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "0b3195507c641ddb6910d2bb5adee89c",
        "1.25 GB",
    ),
    "vit_b": Checkpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "01ec64d29a2fca3f0661936605ae66f8",
        "375 MB",
    ),
    "vit_t": Checkpoint(
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "f3c0d8cda613564d499310dab6c812cd",
        "40 MB",
    ),
}


def cached_checkpoint_path(sam_type: str, cache_dir: Path) -> Path:
    return cache_dir / "checkpoints" / CHECKPOINTS[sam_type].filename


def find_checkpoint(sam_type: str, explicit: Path | None, cache_dir: Path) -> Path | None:
    """The checkpoint to load without downloading anything, or None when there is none locally."""
    if explicit is not None:
        if not explicit.is_file():
            raise CheckpointError(f"USAM_SAM_CHECKPOINT points to {explicit}, which is not a file")
        return explicit
    if sam_type not in CHECKPOINTS:
        return None
    cached = cached_checkpoint_path(sam_type, cache_dir)
    return cached if cached.is_file() else None


def resolve_checkpoint(sam_type: str, explicit: Path | None, cache_dir: Path) -> Path:
    """The checkpoint file for ``sam_type``: the explicit one, the cached one, or a fresh download."""
    found = find_checkpoint(sam_type, explicit, cache_dir)
    if found is not None:
        return found
    if sam_type not in CHECKPOINTS:
        raise CheckpointError(f"SAM type {sam_type!r} has no official checkpoint to download")
    spec = CHECKPOINTS[sam_type]
    target = cached_checkpoint_path(sam_type, cache_dir)
    download_checkpoint(spec.url, target, spec.md5, label=f"SAM {sam_type} ({spec.size_hint})")
    return target


def download_checkpoint(url: str, target: Path, md5: str, *, label: str = "checkpoint") -> None:
    """Download ``url`` to ``target`` with a progress bar; keep it only if its MD5 matches.

    The file is written next to ``target`` under a temporary name and renamed when verified, so an
    interrupted or corrupt download never leaves a file that looks finished.
    """
    digest = hashlib.md5()
    try:
        with atomic_path(target) as tmp, tmp.open("wb") as out:
            _stream(url, out, digest, label)
            if digest.hexdigest() != md5:
                raise CheckpointError(
                    f"the file downloaded from {url} has MD5 {digest.hexdigest()}, expected {md5}: "
                    f"it is corrupt or not the official checkpoint. Download it yourself to {target}, "
                    "or set USAM_SAM_CHECKPOINT to a checkpoint you trust."
                )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CheckpointError(
            f"could not download {label} from {url} ({exc}). Without internet access, download it "
            f"elsewhere and put it at {target}, or set USAM_SAM_CHECKPOINT to its path."
        ) from None


def _stream(url: str, out: BinaryIO, digest: Any, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "usam (checkpoint download)"})
    with urllib.request.urlopen(request, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {label}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
