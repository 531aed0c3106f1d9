"""Label Studio's brush RLE, decoded within bounds.

The format (``label_studio_sdk.converter.brush``, after thi.ng's rle-pack) is a bit stream, most
significant bit first: a 32-bit count of values, the word size minus 1 (5 bits) and four run-length
field widths minus 1 (4 bits each); then records until the count is reached, each a flag bit (1:
one value repeated, 0: a chunk of values), a 2-bit index into the widths, the number of values
minus 1 in that many bits, and the value (a chunk: its values), word-size bits each. A brush mask is
an HxW RGBA image flattened to H x W x 4 values; the mask is its alpha channel above 127. The
encoder is :func:`usam_backend.core.masks.brush_rle`.

The SDK's decoder allocates whatever the count says before reading a run. Here the count must be
the image's, the input no longer than that many values can take, its items bytes, the runs must end
on the count and the values fit a byte, all checked before more than O(H x W x 4) bytes are spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from usam_backend.core.errors import UsamError

HEADER_BITS = 32 + 5 + 4 * 4
CHUNK_BITS = 1 << 15
"""Records are found this many candidate bit positions at a time (bounds the work arrays)."""


class BrushRLEError(UsamError, ValueError):
    """A brush RLE that does not decode to an image of the size it claims."""


def decode_brush_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a Label Studio brush RLE: its alpha channel above 127.

    Raises:
        BrushRLEError: the RLE is not that of an HxW RGBA image (see :func:`brush_rle_values`).
    """
    return brush_rle_values(rle, height, width)[3::4].reshape(height, width) > 127


def brush_rle_values(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """The (H x W x 4,) uint8 RGBA values of a brush RLE, as ``label_studio_sdk``'s ``decode_rle``
    gives them for every RLE it reads correctly.

    Raises:
        BrushRLEError: refused by :func:`check_brush_rle`, or while decoding, when an item is not a
            byte, the records run short of or past the count, or a value exceeds 255.
    """
    word, widths = check_brush_rle(rle, height, width)
    data = np.concatenate([_as_bytes(rle), np.zeros(8, np.uint8)])
    return _decode(data, 8 * len(rle), height * width * 4, word, np.array(widths, np.int64))


def check_brush_rle(rle: Sequence[int], height: int, width: int) -> tuple[int, list[int]]:
    """Check a brush RLE's header against an HxW RGBA image, reading nothing past it: the count must
    be H x W x 4, and the input no longer than any encoding of that many values. Returns the word
    size and the four run-length field widths.

    Raises:
        BrushRLEError: it is not a list of at least 7 bytes, or fails either check.
    """
    if height < 1 or width < 1 or height * width * 4 >= 1 << 32:
        raise BrushRLEError(f"a {width}x{height} image has no brush RLE (1 to 2**30 pixels)")
    if isinstance(rle, str | bytes) or not isinstance(rle, Sequence | np.ndarray) or len(rle) < 7:
        raise BrushRLEError("a brush RLE is a list of at least 7 bytes")
    header = int.from_bytes(_as_bytes(rle[:7]).tobytes(), "big") >> 3
    count, word = header >> 21, ((header >> 16) & 31) + 1
    widths = [((header >> shift) & 15) + 1 for shift in (12, 8, 4, 0)]
    expected = height * width * 4
    if count != expected:
        raise BrushRLEError(f"the RLE holds {count:,} values, a {width}x{height} RGBA image {expected:,}")
    longest = -(-(HEADER_BITS + count * (3 + max(widths) + word)) // 8) + 1  # +1: the SDK pads a whole byte
    if len(rle) > longest:
        raise BrushRLEError(f"the RLE has {len(rle):,} bytes, more than {longest:,} for {count:,} values")
    return word, widths


def _as_bytes(items: Sequence[int] | np.ndarray) -> np.ndarray:
    try:
        array = np.asarray(items)
    except (TypeError, ValueError, OverflowError):
        array = np.asarray([], dtype=object)
    if array.ndim != 1 or array.dtype.kind not in "biu":
        raise BrushRLEError("a brush RLE is a flat list of integers")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise BrushRLEError("a brush RLE holds bytes: integers 0 to 255")
    return array.astype(np.uint8)


def _decode(data: np.ndarray, n_bits: int, count: int, word: int, widths: np.ndarray) -> np.ndarray:
    """Walk the records from bit ``HEADER_BITS`` of ``data`` (padded with 8 zero bytes).

    Where a record ends depends on its own fields, so the records are found in order: each chunk of
    bit positions gets every candidate's end at once, and the walk through them is a list lookup."""
    out = np.empty(count, np.uint8)
    done, position = 0, HEADER_BITS
    while done < count:
        if position >= n_bits:
            raise BrushRLEError(f"the RLE ends after {done:,} of its {count:,} values")
        records = _records(data, np.arange(position, min(position + CHUNK_BITS, n_bits)), word, widths)
        lengths = (records.ends - records.positions).tolist()  # mostly small, cached ints: quick to list
        walked, k, n = [], 0, len(lengths)
        while k < n:
            walked.append(k)
            k += lengths[k]
        found = np.array(walked, dtype=np.int64)
        totals = done + np.cumsum(records.sizes[found])
        last = int(np.searchsorted(totals, count))  # the record reaching the count, if in this chunk
        if last < len(found):
            if totals[last] > count:
                raise BrushRLEError(f"the RLE's runs overflow its {count:,} values")
            found = found[: last + 1]
        end = int(records.ends[found[-1]])
        if end > n_bits:
            raise BrushRLEError(f"the RLE ends within a run ({n_bits:,} bits, {end:,} needed)")
        out[done : int(totals[len(found) - 1])] = _values(data, records, found, word)
        done, position = int(totals[len(found) - 1]), end
    return out


@dataclass(frozen=True)
class _Records:
    """The fields of a record starting at each of ``positions`` (bit offsets): whether it repeats
    one value, the bits of its size field, its number of values, and the bit where it ends."""

    positions: np.ndarray
    repeat: np.ndarray
    size_bits: np.ndarray
    sizes: np.ndarray
    ends: np.ndarray


def _records(data: np.ndarray, positions: np.ndarray, word: int, widths: np.ndarray) -> _Records:
    head = _windows(data, positions)
    repeat = (head >> 63).astype(bool)
    size_bits = widths[(head >> 61) & 3]
    sizes = ((head << 3) >> (64 - size_bits).astype(np.uint64)).astype(np.int64) + 1
    ends = positions + 3 + size_bits + word * np.where(repeat, 1, sizes)
    return _Records(positions, repeat, size_bits, sizes, ends)


def _values(data: np.ndarray, records: _Records, found: np.ndarray, word: int) -> np.ndarray:
    """The values of the records at ``found``, each repeated as its record says."""
    repeat, sizes = records.repeat[found], records.sizes[found]
    reads = np.where(repeat, 1, sizes)  # a chunk's values are read one by one
    first = np.cumsum(reads) - reads
    at = np.repeat(records.positions[found] + 3 + records.size_bits[found] - word * first, reads)
    at += word * np.arange(len(at), dtype=np.int64)
    values = _windows(data, at) >> (64 - word)
    if values.size and values.max() > 255:
        raise BrushRLEError(f"the RLE holds a value of {int(values.max())}: RGBA values are bytes")
    return np.repeat(values.astype(np.uint8), np.repeat(np.where(repeat, sizes, 1), reads))


def _windows(data: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The 64 bits of ``data`` from each bit position on, as uint64 (its first 57 are in range)."""
    words: np.ndarray = np.ndarray(shape=(len(data) - 7,), dtype=">u8", buffer=data, strides=(1,))  # overlapping
    return words[positions >> 3].astype(np.uint64) << (positions & 7).astype(np.uint64)
