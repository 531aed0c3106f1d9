"""Reading images into the one layout the engine takes: HxWx3 uint8 RGB.

Grayscale, palette, 16-bit and float images are converted; transparent pixels are composited on
white; EXIF orientation is applied (browsers, and so Label Studio, show images that way).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from usam_backend.core.errors import ImageError

MIN_SIDE = 16
"""Images with a side shorter than this many pixels are refused: no object to find there."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, *, max_pixels: int) -> np.ndarray:
    """Decode ``source`` (a path, encoded bytes or a PIL image) to an HxWx3 uint8 RGB array.

    Raises:
        ImageError: unreadable or corrupt data, fewer than ``MIN_SIDE`` pixels on a side,
            or more than ``max_pixels`` pixels (checked before the pixels are decoded).
    """
    name = _describe(source)
    with warnings.catch_warnings():
        # Pillow's own warning threshold is not ours: USAM_MAX_IMAGE_PIXELS decides, below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = _open(source)
            _check_size(image.size, name, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(
                f"{name} is over the limit of {max_pixels:,} pixels ({exc}); raise USAM_MAX_IMAGE_PIXELS to accept it"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name} is not a readable image ({exc})") from None
    return to_rgb_array(image)


def peek_size(source: ImageSource, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image as :func:`load_image` would return it (EXIF rotation applied),
    read from its header without decoding the pixels.

    Raises:
        ImageError: unreadable, too small, or more than ``max_pixels`` pixels.
    """
    name = _describe(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = _open(source)
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                width, height = height, width
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name} is not a readable image ({exc})") from None
    _check_size((width, height), name, max_pixels)
    return width, height


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to HxWx3 uint8 RGB."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _stretch_to_uint8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def check_array(image: np.ndarray, *, max_pixels: int, name: str = "image") -> np.ndarray:
    """Validate an array that claims to be HxWx3 uint8 RGB (for callers that decode themselves)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"{name} must be an HxWx3 uint8 RGB array, got shape {image.shape} {image.dtype}")
    _check_size((image.shape[1], image.shape[0]), name, max_pixels)
    return image


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        if not source:
            raise ImageError("the image data is empty (0 bytes)")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    return Image.open(path)


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name} is {width}x{height} pixels; usam needs at least {MIN_SIDE}x{MIN_SIDE}")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(raise USAM_MAX_IMAGE_PIXELS to accept it)"
        )


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly map a high-bit-depth single-channel image onto 0..255 (min to max)."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def _describe(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return f"image {source}"
    return "the image"
