import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from usam_backend.core.errors import ImageError
from usam_backend.core.images import load_image

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_rgb_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    image = load_image(encode(Image.fromarray(pixels)), max_pixels=LIMIT)
    assert image.dtype == np.uint8 and image.shape == (40, 50, 3)
    assert np.array_equal(image, pixels)


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK"])
def test_other_modes_become_rgb(mode):
    image = load_image(encode(Image.new("RGB", (32, 24), (10, 200, 30)).convert(mode), "TIFF"), max_pixels=LIMIT)
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8


def test_rgba_is_composited_on_white():
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[:10, :, :] = (255, 0, 0, 255)  # opaque red top, fully transparent bottom
    image = load_image(encode(Image.fromarray(rgba, "RGBA")), max_pixels=LIMIT)
    assert tuple(image[0, 0]) == (255, 0, 0)
    assert tuple(image[-1, -1]) == (255, 255, 255)


def test_16_bit_grayscale_is_stretched_to_8_bit():
    values = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    image = load_image(encode(Image.fromarray(values)), max_pixels=LIMIT)
    assert image.shape == (32, 32, 3)
    assert image.min() == 0 and image.max() == 255  # a dark 16-bit range still uses the full 8 bits


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())
    assert load_image(data, max_pixels=LIMIT).shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a readable image"),
        (encode(Image.new("RGB", (64, 64)))[:60], "not a readable image"),  # truncated
        (encode(Image.new("RGB", (1, 1))), "needs at least"),
        (encode(Image.new("RGB", (400, 8))), "needs at least"),
    ],
)
def test_bad_images_give_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data, max_pixels=LIMIT)


def test_oversized_image_is_refused_before_decoding():
    bomb = png_header_only(200_000, 200_000)  # 40 gigapixels declared in a few hundred bytes
    with pytest.raises(ImageError, match=r"over the limit of 10,000,000.*USAM_MAX_IMAGE_PIXELS"):
        load_image(bomb, max_pixels=LIMIT)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png", max_pixels=LIMIT)
