"""Reading and writing video: files through PyAV (FFmpeg inside the wheel), frame folders by name.

A clip is read into a :class:`Clip`: HxWx3 uint8 RGB frames, their 0-based indices in the source
(frame-accurate: the index comes from each frame's timestamp, not from counting) and the frame rate.
usam assumes a constant frame rate, as Label Studio does (it shows ``round(duration x fps)``
frames and places keyframes at ``frame / fps``); a file whose timestamps drift from that by more
than half a frame is refused with the command that re-encodes it.

Frame folders are DAVIS's ``JPEGImages/<sequence>`` layout: one image per frame, ordered by the
numbers in their names (``00000.jpg``, ``00001.jpg``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from usam_backend.core.errors import ImageError
from usam_backend.core.images import IMAGE_EXTENSIONS, load_image

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})
DEFAULT_FPS = 24.0
"""Label Studio's default ``frameRate``, and the rate assumed for frame folders."""

REENCODE = "ffmpeg -i IN -vf fps=24 -c:v libx264 -pix_fmt yuv420p OUT.mp4"


class VideoError(ImageError):
    """A video could not be read, has a variable frame rate, or is outside the limits usam accepts."""


@dataclass
class Clip:
    """Decoded frames of one video.

    Attributes:
        frames: HxWx3 uint8 RGB, in order.
        indices: each frame's 0-based index in the source (``indices[i]`` for ``frames[i]``).
        fps: frames per second of the source.
        frame_count: frames in the whole source (not only those read).
        name: the file or folder name, for messages and outputs.
        names: a frame folder's file names (without suffix) of the frames read; None for files.
    """

    frames: list[np.ndarray]
    indices: list[int]
    fps: float
    frame_count: int
    name: str = ""
    names: list[str] | None = None

    @property
    def duration(self) -> float:
        """Seconds, as Label Studio computes the frame count back from it (``frames / fps``)."""
        return self.frame_count / self.fps

    def __len__(self) -> int:
        return len(self.frames)


def read_clip(
    source: str | Path | bytes, *, stride: int = 1, start: int = 0, stop: int | None = None,
    max_frames: int = 10_000, max_pixels: int = 40_000_000, fps: float | None = None,
) -> Clip:  # fmt: skip
    """The frames ``start <= i < stop`` with ``i % stride == 0`` of a video file, encoded bytes or
    frame folder (default: every ``stride``-th frame of the whole clip). A file is sought to the
    keyframe before ``start``, so a later range costs no decoding of the frames before it.

    Args:
        fps: the frame rate of a frame folder (default 24); for files, the stream's own rate is used.

    Raises:
        VideoError: unreadable or empty, a variable frame rate, frames larger than ``max_pixels``,
            or more than ``max_frames`` frames to read.
    """
    if stride < 1:
        raise VideoError(f"the frame stride must be at least 1, got {stride}")
    if start < 0 or (stop is not None and stop <= start):
        raise VideoError(f"the frame range {start}-{stop} is empty")
    if isinstance(source, str | Path) and Path(source).is_dir():
        return _read_folder(Path(source), stride, start, stop, max_frames, max_pixels, fps or DEFAULT_FPS)
    return _read_file(source, stride, start, stop, max_frames, max_pixels)


def frame_folder(path: Path) -> list[Path]:
    """A folder's images in frame order (by the numbers in their names)."""
    files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=_natural_key)


def _natural_key(path: Path) -> tuple[object, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def _read_folder(
    path: Path, stride: int, start: int, stop: int | None, max_frames: int, max_pixels: int, fps: float
) -> Clip:
    files = frame_folder(path)
    if not files:
        raise VideoError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    chosen = [i for i in range(start, min(len(files), stop or len(files))) if i % stride == 0]
    _check_count(len(chosen), max_frames, path.name)
    frames = [load_image(files[i], max_pixels=max_pixels) for i in chosen]
    if len({f.shape for f in frames}) > 1:
        raise VideoError(f"the frames in {path} do not all have the same size")
    return Clip(frames, chosen, fps, len(files), path.name, [files[i].stem for i in chosen])


def _read_file(
    source: str | Path | bytes, stride: int, start: int, stop: int | None, max_frames: int, max_pixels: int
) -> Clip:
    import io

    import av

    name = Path(source).name if isinstance(source, str | Path) else "video"
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(opened, mode="r") as container:
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
            frames, indices, count = _decode(container, stream, rate, stride, start, stop, max_frames, name)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name} could not be decoded as video: {str(exc)[:200]}") from None
    if not frames:
        raise VideoError(f"{name} holds no frames" + (f" from frame {start}" if start else ""))
    return Clip(frames, indices, float(rate), count, name)


def _decode(container, stream, rate, stride, start, stop, max_frames, name):  # type: ignore[no-untyped-def]
    """Decode frames [start, stop) keeping every stride-th; each frame's index comes from its time."""
    frames: list[np.ndarray] = []
    indices: list[int] = []
    base = stream.time_base
    origin = float(stream.start_time * base) if stream.start_time is not None and base else None
    if start and origin is not None:
        container.seek(int((origin + start / rate) / base), stream=stream, backward=True, any_frame=False)
    previous: int | None = None
    count = 0
    for frame in container.decode(stream):
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
        count = index + 1
        if stop is not None and index >= stop:
            count = _frame_count(container, stream, rate, count)
            break
        if index < start or index % stride:
            continue
        if len(frames) >= max_frames:
            _check_count(len(frames) + 1, max_frames, name)
        frames.append(frame.to_ndarray(format="rgb24"))
        indices.append(index)
    return frames, indices, count


def _frame_count(container, stream, rate, seen: int) -> int:  # type: ignore[no-untyped-def]
    """Frames in the whole stream, when decoding stopped early: the container's count, else its duration."""
    if stream.frames:
        return max(seen, int(stream.frames))
    if stream.duration is not None and stream.time_base:
        return max(seen, round(float(stream.duration * stream.time_base) * rate))
    if container.duration:
        return max(seen, round(container.duration / 1_000_000 * rate))
    return seen


def probe_video(source: str | Path | bytes, *, max_pixels: int = 40_000_000) -> tuple[int, float, int, int]:
    """(frame count, fps, width, height) of a video file without decoding it all (the first frame
    only, and the container's frame count or duration).

    Raises:
        VideoError: unreadable, no video stream, or frames larger than ``max_pixels``.
    """
    clip = read_clip(source, stop=1, max_frames=1, max_pixels=max_pixels)
    height, width = clip.frames[0].shape[:2]
    return clip.frame_count, clip.fps, width, height


def _check_count(n: int, max_frames: int, name: str) -> None:
    if n > max_frames:
        raise VideoError(
            f"{name}: more than {max_frames:,} frames to read (USAM_VIDEO_MAX_FRAMES); sample it with a larger "
            "stride or cut it"
        )


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
