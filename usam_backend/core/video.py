"""Reading and writing video: files through PyAV (FFmpeg inside the wheel), frame folders by name.

A clip is read into a :class:`Clip`: HxWx3 uint8 RGB frames, their 0-based indices in the source
(frame-accurate: the index comes from each frame's timestamp, not from counting) and the frame rate.
usam assumes a constant frame rate, as Label Studio does (it shows ``round(duration x fps)``
frames and places keyframes at ``frame / fps``); a file whose timestamps drift from that by more
than half a frame is refused with the command that re-encodes it.

Frames come as players show them: a file whose display matrix turns its coded pictures (a phone
video coded 320x180 and shown 180x320) is turned the same way, as ``ffmpeg`` does by default.

Untrusted bytes meet one FFmpeg demuxer only, chosen from their first bytes: ISO base media (MP4,
MOV, M4V), Matroska (MKV, WebM) or AVI, the kinds in :data:`VIDEO_EXTENSIONS`. Anything else is
refused before FFmpeg parses it.

Frame folders are DAVIS's ``JPEGImages/<sequence>`` layout: one image per frame, ordered by the
numbers in their names (``00000.jpg``, ``00001.jpg``, ...).
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from usam_backend.core.errors import ImageError
from usam_backend.core.images import IMAGE_EXTENSIONS, load_image

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})
DEFAULT_FPS = 24.0
"""Label Studio's default ``frameRate``, and the rate assumed for frame folders."""

REENCODE = "ffmpeg -i IN -vf fps=24 -c:v libx264 -pix_fmt yuv420p OUT.mp4"
ACCEPTED_KINDS = "MP4/MOV/M4V (ISO base media), MKV/WebM (Matroska) or AVI"

_ISO_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})
"""Box types a QuickTime or ISO base media file starts with (bytes 4-8); modern files start with ``ftyp``."""
_SNIFF_BYTES = 12


class VideoError(ImageError):
    """A video could not be read, has a variable frame rate, or is outside the limits usam accepts."""


class EmptyRange(VideoError):
    """A video file holds no frame from the start of the range asked for (it ends before it)."""


@dataclass
class Clip:
    """Decoded frames of one video.

    Attributes:
        frames: HxWx3 uint8 RGB, in order, as players show them (display rotation applied).
        indices: each frame's 0-based index in the source (``indices[i]`` for ``frames[i]``).
        fps: frames per second of the source.
        frame_count: frames in the whole source (not only those read).
        name: the file or folder name, for messages and outputs.
        names: a frame folder's file names (without suffix) of the frames read; None for files.
        rotation: degrees the coded pictures were turned counterclockwise to show them (0, 90, 180
            or 270), from the file's display matrix.
    """

    frames: list[np.ndarray]
    indices: list[int]
    fps: float
    frame_count: int
    name: str = ""
    names: list[str] | None = None
    rotation: int = 0

    @property
    def duration(self) -> float:
        """Seconds, as Label Studio computes the frame count back from it (``frames / fps``)."""
        return self.frame_count / self.fps

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class _Range:
    """The source frames a read keeps: ``start <= i < stop`` with ``i % stride == 0`` (``stop`` None:
    to the end), plus the range's last frame with ``keep_last``; at most ``max_frames`` kept and at
    most ``max_source_frames`` source frames from ``start`` decoded."""

    start: int
    stop: int | None
    stride: int
    max_frames: int
    max_source_frames: int | None
    keep_last: bool

    def sampled(self, index: int) -> bool:
        return index % self.stride == 0

    def check_source(self, index: int, name: str) -> None:
        """Raise when source frame ``index`` is past the ``max_source_frames`` budget."""
        if self.max_source_frames is not None and index - self.start >= self.max_source_frames:
            raise VideoError(
                f"{name}: more than {self.max_source_frames:,} frames to decode from frame {self.start} (the "
                f"container may understate its length); read a shorter range or re-encode it: {REENCODE}"
            )

    def check_kept(self, n: int, name: str) -> None:
        """Raise when ``n`` frames kept are more than ``max_frames``."""
        if n > self.max_frames:
            raise VideoError(
                f"{name}: more than {self.max_frames:,} frames to read (USAM_VIDEO_MAX_FRAMES); sample it with a "
                "larger stride or cut it"
            )

    def indices(self, length: int, name: str) -> list[int]:
        """The indices kept from a source of ``length`` frames (a frame folder)."""
        end = length if self.stop is None else min(length, self.stop)
        chosen = [i for i in range(self.start, end) if self.sampled(i)]
        if self.keep_last and end > self.start and (not chosen or chosen[-1] != end - 1):
            chosen.append(end - 1)
        if end > self.start:
            self.check_source(end - 1, name)
        self.check_kept(len(chosen), name)
        return chosen


def read_clip(
    source: str | Path | bytes, *, stride: int = 1, start: int = 0, stop: int | None = None,
    max_frames: int = 10_000, max_pixels: int = 40_000_000, fps: float | None = None,
    max_source_frames: int | None = None, keep_last: bool = False,
) -> Clip:  # fmt: skip
    """The frames ``start <= i < stop`` with ``i % stride == 0`` of a video file, encoded bytes or
    frame folder (default: every ``stride``-th frame of the whole clip). A file is sought to the
    keyframe before ``start``, so a later range costs no decoding of the frames before it; a seek
    that lands after ``start`` (an inexact index) is detected and the range decoded from the start.

    Args:
        max_frames: the most frames kept (after striding).
        max_pixels: the most pixels a coded frame may have.
        fps: the frame rate of a frame folder (default 24); for files, the stream's own rate is used.
        max_source_frames: the most source frames decoded from ``start`` (before striding): bounds the
            work of a read with ``stop=None`` when the container understates the video's length.
        keep_last: also keep the range's last frame (the one before ``stop``, or the source's last)
            when the stride skips it, so the sampled frames span the whole range.

    Raises:
        VideoError: unreadable, of a kind usam does not read, or empty; a variable frame rate; frames
            larger than ``max_pixels``; more than ``max_frames`` frames to keep or more than
            ``max_source_frames`` to decode.
    """
    if stride < 1:
        raise VideoError(f"the frame stride must be at least 1, got {stride}")
    if start < 0 or (stop is not None and stop <= start):
        raise VideoError(f"the frame range {start}-{stop} is empty")
    if max_source_frames is not None and max_source_frames < 1:
        raise VideoError(f"max_source_frames must be at least 1, got {max_source_frames}")
    wanted = _Range(start, stop, stride, max_frames, max_source_frames, keep_last)
    if isinstance(source, str | Path) and Path(source).is_dir():
        return _read_folder(Path(source), wanted, max_pixels, fps or DEFAULT_FPS)
    return _read_file(source, wanted, max_pixels)


def probe_video(source: str | Path | bytes, *, max_pixels: int = 40_000_000) -> tuple[int, float, int, int]:
    """(frame count, fps, width, height) of a video file without decoding it all (the first frame
    only, and the container's frame count or duration). Width and height are as displayed (a
    90-degree display rotation swaps the coded ones).

    Raises:
        VideoError: unreadable, no video stream, or frames larger than ``max_pixels``.
    """
    clip = read_clip(source, stop=1, max_frames=1, max_pixels=max_pixels)
    height, width = clip.frames[0].shape[:2]
    return clip.frame_count, clip.fps, width, height


def frame_folder(path: Path) -> list[Path]:
    """A folder's images in frame order (by the numbers in their names)."""
    files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=_natural_key)


def _natural_key(path: Path) -> tuple[object, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def _read_folder(path: Path, wanted: _Range, max_pixels: int, fps: float) -> Clip:
    files = frame_folder(path)
    if not files:
        raise VideoError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    chosen = wanted.indices(len(files), path.name)
    frames = [load_image(files[i], max_pixels=max_pixels) for i in chosen]
    if len({f.shape for f in frames}) > 1:
        raise VideoError(f"the frames in {path} do not all have the same size")
    return Clip(frames, chosen, fps, len(files), path.name, [files[i].stem for i in chosen])


# --- files ----------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    """What a decode kept: HxWx3 uint8 RGB frames as displayed, their source indices, the source's
    frame count (at least the frames seen) and the display rotation applied (degrees, counterclockwise)."""

    frames: list[np.ndarray] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    frame_count: int = 0
    rotation: int = 0


class _SeekOvershot(Exception):
    """A seek landed after the first frame wanted (the container's index is inexact)."""


def _read_file(source: str | Path | bytes, wanted: _Range, max_pixels: int) -> Clip:
    import av

    name = Path(source).name if isinstance(source, str | Path) else "video"
    try:
        demuxer = _demuxer(source, name)
        try:
            decoded, rate = _read_container(source, demuxer, wanted, max_pixels, name, seek=True)
        except _SeekOvershot:
            decoded, rate = _read_container(source, demuxer, wanted, max_pixels, name, seek=False)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name} could not be decoded as video: {str(exc)[:200]}") from None
    if not decoded.frames:
        raise EmptyRange(f"{name} holds no frames" + (f" from frame {wanted.start}" if wanted.start else ""))
    return Clip(decoded.frames, decoded.indices, float(rate), decoded.frame_count, name, rotation=decoded.rotation)


def _demuxer(source: str | Path | bytes, name: str) -> str:
    """The one FFmpeg demuxer allowed to parse ``source``, chosen from its first bytes."""
    if isinstance(source, bytes):
        head = source[:_SNIFF_BYTES]
    else:
        with open(source, "rb") as file:
            head = file.read(_SNIFF_BYTES)
    demuxer = _demuxer_for(head)
    if demuxer is None:
        raise VideoError(
            f"{name} could not be decoded as video: it is not {ACCEPTED_KINDS} (judged by its first bytes); "
            f"re-encode it: {REENCODE}"
        )
    return demuxer


def _demuxer_for(head: bytes) -> str | None:
    """FFmpeg's demuxer name for a file starting with ``head`` (its first 12 bytes), or None."""
    if head[4:8] in _ISO_BOXES:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _read_container(
    source: str | Path | bytes, demuxer: str, wanted: _Range, max_pixels: int, name: str, *, seek: bool
) -> tuple[_Decoded, Fraction]:
    """Open ``source`` with ``demuxer`` only and decode ``wanted`` from its first video stream."""
    import av

    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(opened, mode="r", format=demuxer) as container:
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoError(f"{name} does not say its frame rate; re-encode it: {REENCODE}")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoError(
                f"{name} is {width}x{height}, more than {max_pixels:,} pixels a frame (USAM_MAX_IMAGE_PIXELS)"
            )
        return _decode(container, stream, rate, wanted, name, seek=seek), rate


def _decode(
    container: InputContainer, stream: VideoStream, rate: Fraction, wanted: _Range, name: str, *, seek: bool
) -> _Decoded:
    """Decode the frames ``wanted`` keeps, seeking first when ``seek`` and ``wanted.start > 0``.

    The display rotation is read from the first decoded frame and applied to every frame kept. With
    ``keep_last`` only the latest in-range frame the stride skipped is held, not yet converted to RGB.

    Raises:
        _SeekOvershot: the seek landed after ``wanted.start``.
    """
    base = stream.time_base
    origin = float(stream.start_time * base) if stream.start_time is not None and base else None
    sought = False
    if seek and wanted.start and origin is not None and base:
        _seek(container, stream, int((origin + wanted.start / rate) / base))
        sought = True
    numbered = _numbered(container.decode(stream), rate, origin, name)
    out = _Decoded()
    first = next(numbered, None)
    if first is None:
        return out
    if sought and first[0] > wanted.start:
        raise _SeekOvershot
    turns = _quarter_turns(first[1].rotation)
    held: tuple[int, VideoFrame] | None = None
    for index, frame in itertools.chain([first], numbered):
        if wanted.stop is not None and index >= wanted.stop:
            out.frame_count = _frame_count(container, stream, rate, index + 1)
            break
        out.frame_count = index + 1
        if index < wanted.start:
            continue
        wanted.check_source(index, name)
        if wanted.sampled(index):
            _keep(out, index, frame, turns, wanted, name)
            held = None
        elif wanted.keep_last:
            held = (index, frame)
    if held is not None:
        _keep(out, *held, turns, wanted, name)
    out.rotation = 90 * turns
    return out


def _seek(container: InputContainer, stream: VideoStream, pts: int) -> None:
    """Seek to the keyframe at or before ``pts`` (in the stream's time base)."""
    container.seek(pts, stream=stream, backward=True, any_frame=False)


def _numbered(
    frames: Iterator[VideoFrame], rate: Fraction, origin: float | None, name: str
) -> Iterator[tuple[int, VideoFrame]]:
    """Each decoded frame with its 0-based source index: its time since ``origin`` (the stream's
    start; the first frame's when None) times ``rate``.

    Raises:
        VideoError: an index that does not follow the one before (a variable frame rate).
    """
    previous: int | None = None
    for frame in frames:
        if frame.time is None:
            index = 0 if previous is None else previous + 1
        else:
            origin = frame.time if origin is None else origin
            index = round((frame.time - origin) * rate)
        if previous is not None and index != previous + 1:
            raise VideoError(
                f"{name} has a variable frame rate (after frame {previous} comes one stamped at frame {index} of "
                f"{float(rate):g} fps); usam and Label Studio need a constant rate. Re-encode it: {REENCODE}"
            )
        previous = index
        yield index, frame


def _quarter_turns(degrees: float) -> int:
    """Counterclockwise quarter turns (0-3) for a display rotation in degrees (counterclockwise, as
    ``VideoFrame.rotation`` gives it). Other angles are left unturned, as ``ffmpeg`` leaves them."""
    turns = round(degrees / 90)
    return turns % 4 if abs(degrees - 90 * turns) <= 2 else 0


def _keep(out: _Decoded, index: int, frame: VideoFrame, turns: int, wanted: _Range, name: str) -> None:
    wanted.check_kept(len(out.frames) + 1, name)
    out.frames.append(_displayed(frame, turns))
    out.indices.append(index)


def _displayed(frame: VideoFrame, turns: int) -> np.ndarray:
    """The frame as HxWx3 uint8 RGB turned ``turns`` quarter turns counterclockwise (as displayed)."""
    rgb = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _frame_count(container: InputContainer, stream: VideoStream, rate: Fraction, seen: int) -> int:
    """Frames in the whole stream, when decoding stopped early: the container's count, else its duration."""
    if stream.frames:
        return max(seen, int(stream.frames))
    if stream.duration is not None and stream.time_base:
        return max(seen, round(float(stream.duration * stream.time_base) * rate))
    if container.duration:
        return max(seen, round(container.duration / 1_000_000 * rate))
    return seen


# --- writing --------------------------------------------------------------------------------------


def write_video(
    path: Path, frames: Sequence[np.ndarray] | Iterator[np.ndarray], fps: float, *, kind: str | None = None
) -> Path:
    """Encode HxWx3 uint8 RGB frames: H.264 MP4 (yuv420p, what browsers and Label Studio play) for
    ``.mp4``/``.mov``, VP9 for ``.webm``, an animated GIF for ``.gif``. Odd sides are cropped by a pixel.

    Args:
        kind: the container by name ("mp4", "webm", "gif"...) when ``path``'s suffix does not say it.
    """
    import av

    suffix = f".{kind}" if kind else path.suffix.lower()
    frames = iter(frames)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        if not images:
            raise VideoError("no frames to write")
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    codec = {".webm": "libvpx-vp9"}.get(suffix, "libx264")
    with av.open(
        str(path), mode="w", format={".mov": "mov", ".webm": "webm", ".mkv": "matroska"}.get(suffix, "mp4")
    ) as container:
        stream: av.VideoStream | None = None
        for frame in frames:
            h, w = (frame.shape[0] // 2) * 2, (frame.shape[1] // 2) * 2
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))  # type: ignore[assignment]
                assert isinstance(stream, av.VideoStream)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), "rgb24")):
                container.mux(packet)
        if stream is None:
            raise VideoError("no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return path
