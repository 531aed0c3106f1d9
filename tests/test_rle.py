"""Label Studio's brush RLE decoded within bounds: the same values as ``label_studio_sdk`` for every
valid stream (usam's encoder, the SDK's, streams as Label Studio's editor writes them), and hostile
ones refused before they cost more than the image's own size."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle

from usam_backend.core.masks import brush_rle
from usam_backend.core.rle import BrushRLEError, brush_rle_values, check_brush_rle, decode_brush_rle
from usam_backend.labelstudio.config import parse_label_config
from usam_backend.labelstudio.interactive import PromptError, parse_brush_strokes

MiB = 1 << 20
WIDTHS = (3, 4, 8, 16)


def pack(count: int, records: list[tuple[bool, list[int]]], word: int = 8, widths=WIDTHS, index=None) -> list[int]:
    """A brush RLE from explicit records: (True, [value, n]) repeats a value n times, (False, values)
    is a chunk of values. The size field is the narrowest of ``widths`` that holds it (or ``index``)."""
    bits = [f"{count:032b}", f"{word - 1:05b}", *(f"{w - 1:04b}" for w in widths)]
    for repeat, payload in records:
        n = payload[1] if repeat else len(payload)
        t = index if index is not None else next(i for i, w in enumerate(widths) if n - 1 < 1 << w)
        values = payload[:1] if repeat else payload
        bits += [str(int(repeat)), f"{t:02b}", f"{n - 1:0{widths[t]}b}", *(f"{v:0{word}b}" for v in values)]
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return [int(text[i : i + 8], 2) for i in range(0, len(text), 8)]


def editor_records(values: np.ndarray, longest: int = 1 << 16) -> list[tuple[bool, list[int]]]:
    """Records as Label Studio's editor writes them: a value repeated is one record (split past
    ``longest``), values that differ from their neighbours are gathered into chunks."""
    records: list[tuple[bool, list[int]]] = []
    chunk: list[int] = []
    changes = np.flatnonzero(np.diff(values)) + 1
    for start, stop in zip([0, *changes], [*changes, len(values)], strict=True):
        value, n = int(values[start]), int(stop - start)
        if n == 1:
            chunk.append(value)
            if len(chunk) == longest:
                records.append((False, chunk))
                chunk = []
            continue
        if chunk:
            records.append((False, chunk))
            chunk = []
        while n:
            records.append((True, [value, min(n, longest)]))
            n -= min(n, longest)
    return records + ([(False, chunk)] if chunk else [])


def rgba(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Brush-like RGBA values: a coloured blob with soft (varying alpha) edges and some noise."""
    image = np.zeros((height, width, 4), np.uint8)
    y, x = np.ogrid[:height, :width]
    distance = np.hypot(y - height / 2, x - width / 3) / (min(height, width) / 3 + 1)
    image[..., 3] = np.clip(255 * (1.4 - distance) / 0.4, 0, 255).astype(np.uint8)
    image[image[..., 3] > 0, :3] = (250, 128, 114)
    noise = rng.random((height, width)) < 0.02
    image[noise] = rng.integers(0, 256, (int(noise.sum()), 4))
    return image.reshape(-1)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (16, 16), (37, 53), (300, 260)])
def test_usams_encoder_round_trips(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) < 0.3, np.ones(shape, bool), np.zeros(shape, bool)):
        assert np.array_equal(decode_brush_rle(brush_rle(mask), *shape), mask)


def test_the_same_values_as_the_sdk_on_its_own_and_label_studios_streams():
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(1, 48, 2))
        values = rgba(rng, height, width) if trial % 2 else rng.integers(0, 3, height * width * 4).astype(np.uint8)
        for rle in (encode_rle(values), pack(len(values), editor_records(values))):
            decoded = brush_rle_values(rle, height, width)
            assert np.array_equal(decoded, values) and np.array_equal(decoded, decode_rle(rle))
            assert np.array_equal(decode_brush_rle(rle, height, width), values[3::4].reshape(height, width) > 127)
    long_runs = np.repeat(np.array([0, 255, 7, 0], np.uint8), [70_000, 131_073, 1, 323_214])  # past 2**16: split
    assert np.array_equal(brush_rle_values(pack(len(long_runs), editor_records(long_runs)), 512, 256), long_runs)
    assert np.array_equal(brush_rle_values(encode_rle(long_runs), 512, 256), long_runs)


@pytest.mark.parametrize("word", [1, 4, 8])
def test_other_word_sizes_and_field_widths_from_the_header(word):
    rng = np.random.default_rng(word)
    widths = (1, 2, 5, 16)
    values = rng.integers(0, 1 << word, 6 * 7 * 4).astype(np.uint8)
    values[20:90] = values[20]
    rle = pack(len(values), editor_records(values, longest=1 << 16), word=word, widths=widths)
    assert np.array_equal(brush_rle_values(rle, 6, 7), decode_rle(rle))
    wide = pack(len(values), [(True, [int(values[0]), len(values)])], word=word, widths=widths, index=3)
    assert np.array_equal(brush_rle_values(wide, 6, 7), np.full(len(values), values[0]))


def test_a_hostile_header_is_refused_before_anything_is_allocated():
    hostile = pack(2**32 - 1, [(True, [255, 1 << 16])]) + [255] * 250_000  # about 1 MB of JSON
    tracemalloc.start()
    try:
        with pytest.raises(BrushRLEError, match="4,294,967,295 values, a 64x64 RGBA image 16,384"):
            decode_brush_rle(hostile, 64, 64)
        with pytest.raises(BrushRLEError, match="more than"):  # the right count, but far too long
            decode_brush_rle(pack(64 * 64 * 4, []) + [0] * 250_000, 64, 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB


def test_a_hostile_smart_brush_stroke_is_a_prompt_error_and_costs_little():
    config = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" smart="true">'
        '<Label value="sky"/></BrushLabels></View>'
    )

    def stroke(rle, height=64, width=64):
        return {"type": "brushlabels", "to_name": "image", "from_name": "tag", "original_width": width,
                "original_height": height, "value": {"format": "rle", "rle": rle, "brushlabels": ["sky"]}}  # fmt: skip

    hostile = pack(2**32 - 1, [(True, [255, 1 << 16])]) + [255] * 250_000
    lying = pack(32768 * 32767 * 4, [(True, [255, 1 << 16])] * 4)  # a 4 GB image, said to be the image's size
    tracemalloc.start()
    try:
        with pytest.raises(PromptError, match="could not be read"):
            parse_brush_strokes([stroke(hostile)], config)
        (big,) = parse_brush_strokes([stroke(lying, 32767, 32768)], config)  # only the header is read
        with pytest.raises(PromptError, match=r"\(32768, 32767\) \(W, H\), the image \(64, 64\)"):
            big.mask_on(64, 64)  # checked against the task's image before decoding
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    mask = np.zeros((64, 64), bool)
    mask[10:20, 5:50] = True
    (good,) = parse_brush_strokes([stroke(brush_rle(mask))], config)
    assert np.array_equal(good.mask_on(64, 64), mask) and good.mask is good.mask_on(64, 64)
    (bad,) = parse_brush_strokes([stroke(pack(64 * 64 * 4, [(True, [255, 100])]))], config)  # header fine, runs short
    with pytest.raises(PromptError, match=r"could not be read .*ends after 100 of its 16,384 values"):
        bad.mask_on(64, 64)


def test_truncated_overflowing_and_malformed_streams_are_refused():
    mask = np.random.default_rng(1).random((20, 30)) < 0.5
    rle = brush_rle(mask)
    refused = {
        "truncated": (rle[: len(rle) // 2], "ends"),
        "only a header": (pack(20 * 30 * 4, []), "ends"),
        "runs past the count": (pack(20 * 30 * 4, [(True, [0, 2000]), (True, [255, 401])]), "overflow"),
        "a chunk cut short": (pack(20 * 30 * 4, [(True, [0, 2000]), (False, list(range(200)) * 2)])[:-100], "within"),
        "a value over 255": (pack(20 * 30 * 4, [(True, [256, 2400])], word=9), "value of 256"),
        "an item over 255": ([*rle[:-1], 256], "0 to 255"),
        "a negative item": ([*rle[:-1], -1], "0 to 255"),
        "floats": ([float(v) for v in rle], "integers"),
        "nested lists": ([[v] for v in rle], "integers"),
        "text": ("0123456789", "list"),
        "too short": (rle[:6], "at least 7"),
        "another size": (rle, "a 30x21 RGBA image"),
    }
    for name, (bad, message) in refused.items():
        height = 21 if name == "another size" else 20
        with pytest.raises(BrushRLEError, match=message):
            decode_brush_rle(bad, height, 30)
    for height, width in ((0, 5), (5, -1), (32768, 32768)):
        with pytest.raises(BrushRLEError, match="has no brush RLE"):
            check_brush_rle(rle, height, width)
    assert isinstance(BrushRLEError("x"), ValueError)  # the feedback store skips such a region


def test_a_megapixel_mask_decodes_in_well_under_a_second():
    mask = np.zeros((1024, 1024), bool)
    y, x = np.ogrid[:1024, :1024]
    mask[(y - 500) ** 2 + (x - 400) ** 2 < 300**2] = True
    mask[::7, ::5] ^= True  # ragged: about 30,000 runs
    rle = brush_rle(mask)
    started = time.perf_counter()
    decoded = decode_brush_rle(rle, 1024, 1024)
    assert time.perf_counter() - started < 1.0 and np.array_equal(decoded, mask)
