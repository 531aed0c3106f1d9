"""Reading video files: display rotation as ffmpeg shows it, one demuxer chosen from the first bytes,
seeks that overshoot, the source-frame cap and the always-sampled last frame.

Clips are tiny and written here: an 8x8 white square in the top-left corner of a black 64x32 frame,
moving right 2 pixels a frame, so every turn and every frame index is visible. The ``ffmpeg``
binary (which autorotates by default) is the reference for rotation; its tests skip without it,
and fail with ``USAM_REQUIRE_FFMPEG=1`` (as ``make test`` sets it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from usam_backend.core import video
from usam_backend.core.video import VideoError, probe_video, read_clip

WIDTH, HEIGHT = 64, 32


def square_frames(n: int) -> list[np.ndarray]:
    """HxWx3 uint8 RGB: black, with an 8x8 white square at row 2, column 2 + 2t on frame t."""
    frames = []
    for t in range(n):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[2:10, 2 + 2 * t : 10 + 2 * t] = 255
        frames.append(frame)
    return frames


def write_clip(
    path: Path, n: int = 12, *, fmt: str = "mp4", codec: str = "libx264", rotation: int = 0, gop: int | None = None
) -> Path:
    """Encode ``square_frames(n)`` at 24 fps; ``rotation``: the display matrix's counterclockwise
    degrees; ``gop``: frames between keyframes."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
            stream.options = {"bf": "0", "sc_threshold": "0", "keyint_min": str(gop)}
        if rotation:
            stream.set_display_rotation(rotation)
        for frame in square_frames(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def square_centre(frame: np.ndarray) -> np.ndarray:
    """(row, column) of the white square's centre."""
    return np.argwhere(frame[..., 0] > 128).mean(axis=0)


@pytest.fixture(scope="module")
def ffmpeg() -> str:
    binary = shutil.which("ffmpeg")
    if binary is None:
        if os.environ.get("USAM_REQUIRE_FFMPEG"):
            pytest.fail("ffmpeg is not installed: run `make test` (it installs Debian's ffmpeg)")
        pytest.skip("ffmpeg is not installed here; `make test` installs it")
    return binary


def ffmpeg_frames(binary: str, path: Path, out: Path) -> list[np.ndarray]:
    """Every frame as the ffmpeg command line decodes it (autorotated), HxWx3 uint8 RGB."""
    out.mkdir()
    subprocess.run([binary, "-v", "error", "-i", str(path), str(out / "%03d.png")], check=True, timeout=60)
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("*.png"))]


# --- display rotation -----------------------------------------------------------------------------

# where a counterclockwise turn puts the top-left square of the first frame, as (row, column) of the
# displayed picture, and the displayed (width, height)
TURNED = {0: ((5.5, 5.5), (64, 32)), 90: ((57.5, 5.5), (32, 64)), 180: ((25.5, 57.5), (64, 32)),
          270: ((5.5, 25.5), (32, 64))}  # fmt: skip


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_rotation_frames_are_displayed_orientation(tmp_path, ffmpeg, degrees):
    path = write_clip(tmp_path / "phone.mp4", 8, rotation=degrees)
    shown = ffmpeg_frames(ffmpeg, path, tmp_path / "ffmpeg")
    centre, size = TURNED[degrees]
    assert shown[0].shape[1::-1] == size and np.allclose(square_centre(shown[0]), centre)  # the fixture turns

    clip = read_clip(path)
    assert clip.rotation == degrees and clip.indices == list(range(8))
    assert [f.shape for f in clip.frames] == [f.shape for f in shown]
    for ours, theirs in zip(clip.frames, shown, strict=True):
        assert np.abs(ours.astype(int) - theirs).mean() < 3
        assert np.allclose(square_centre(ours), square_centre(theirs), atol=0.5)
    assert all(f.flags.c_contiguous for f in clip.frames)
    assert probe_video(path) == (8, 24.0, *size)
    assert probe_video(path.read_bytes(), max_pixels=WIDTH * HEIGHT) == (8, 24.0, *size)  # coded size counts
    sought = read_clip(path.read_bytes(), start=5, stride=2)
    assert sought.indices == [6] and np.array_equal(sought.frames[0], clip.frames[6])


def test_rotation_minus_90_is_270(tmp_path):
    clip = read_clip(write_clip(tmp_path / "phone.mp4", 2, rotation=-90))
    assert clip.rotation == 270 and np.allclose(square_centre(clip.frames[0]), TURNED[270][0], atol=0.5)


# --- one demuxer, chosen from the first bytes -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "codec"),
    [("clip.mp4", "mp4", "libx264"), ("clip.mov", "mov", "libx264"), ("clip.mkv", "matroska", "libx264"),
     ("clip.webm", "webm", "libvpx-vp9"), ("clip.avi", "avi", "mpeg4"), ("named.webm", "mp4", "libx264")],
)  # fmt: skip
def test_accepted_containers_read_by_their_bytes(tmp_path, name, fmt, codec):
    path = write_clip(tmp_path / name, 3, fmt=fmt, codec=codec)
    assert read_clip(path).indices == [0, 1, 2]
    assert read_clip(path.read_bytes()).indices == [0, 1, 2]


@pytest.mark.parametrize(("name", "fmt", "codec"), [("clip.flv", "flv", "flv"), ("clip.ts", "mpegts", "libx264"),
                                                    ("clip.nut", "nut", "mpeg4")])  # fmt: skip
def test_unknown_container_refused_before_any_demuxer(tmp_path, monkeypatch, name, fmt, codec):
    path = write_clip(tmp_path / name, 12, fmt=fmt, codec=codec)  # FFmpeg reads these, usam does not
    with av.open(str(path)) as container:
        assert len(list(container.decode(video=0))) == 12
    disguised = tmp_path / "clip.mp4"
    disguised.write_bytes(path.read_bytes())
    opened = []
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args))
    for source in (path, disguised, path.read_bytes(), b"", b"\x1a\x45\xdf"):
        with pytest.raises(VideoError, match=r"could not be decoded as video: it is not MP4/MOV/M4V .* or AVI"):
            read_clip(source)
    with pytest.raises(VideoError, match="not MP4"):
        probe_video(path)
    assert opened == []


# --- a seek that lands after the start ------------------------------------------------------------


def test_seek_overshoot_detected(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "gop2.mp4", 12, gop=2)  # keyframes 0, 2, 4, ...: a seek lands near
    exact = read_clip(path, start=5, stop=9)
    assert exact.indices == [5, 6, 7, 8]
    assert np.allclose(square_centre(exact.frames[0]), (5.5, 15.5), atol=0.5)

    seek, landed = video._seek, []

    def late(container, stream, pts):  # an inexact index: the keyframe 4 frames later
        seek(container, stream, pts + int(4 / 24 / stream.time_base))
        landed.append(pts)

    monkeypatch.setattr(video, "_seek", late)
    clip = read_clip(path, start=5, stop=9)
    assert landed  # it did seek, and landed on frame 8
    assert clip.indices == [5, 6, 7, 8] and clip.frame_count == 12
    assert all(np.array_equal(a, b) for a, b in zip(clip.frames, exact.frames, strict=True))
    assert read_clip(path.read_bytes(), start=5, stride=3).indices == [6, 9]


# --- the cap in source frames ---------------------------------------------------------------------


def test_open_read_capped_in_source_frames(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 12)
    with pytest.raises(VideoError, match="more than 8 frames to decode from frame 0"):
        read_clip(path, stride=5, max_source_frames=8)  # 3 frames kept, 12 decoded
    with pytest.raises(VideoError, match="more than 5 frames to decode from frame 4"):
        read_clip(path.read_bytes(), start=4, stride=4, max_source_frames=5)
    assert read_clip(path, start=4, stride=4, max_source_frames=8).indices == [4, 8]  # frames 4-11
    assert read_clip(path, stop=6, stride=5, max_source_frames=6).indices == [0, 5]
    assert read_clip(path, stride=5, max_source_frames=12).indices == [0, 5, 10]
    with pytest.raises(VideoError, match="more than 11 frames"):
        read_clip(path, stride=5, max_source_frames=11)  # the 12th is one too many
    with pytest.raises(VideoError, match="more than 7 frames"):
        read_clip(path, start=4, stride=4, max_source_frames=7)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(square_frames(12)):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    with pytest.raises(VideoError, match="more than 8 frames to decode"):
        read_clip(folder, stride=5, max_source_frames=8)
    with pytest.raises(VideoError, match="at least 1"):
        read_clip(path, max_source_frames=0)


# --- the last frame --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "start", "stop", "stride", "expected"),
    [(12, 0, None, 5, [0, 5, 10, 11]), (12, 0, 8, 4, [0, 4, 7]), (12, 0, 9, 4, [0, 4, 8]),
     (12, 6, None, 5, [10, 11]), (12, 11, None, 5, [11]), (3, 0, None, 5, [0, 2]), (5, 0, None, 5, [0, 4]),
     (1, 0, None, 5, [0]), (12, 0, None, 1, list(range(12)))],
)  # fmt: skip
def test_last_frame_always_sampled(tmp_path, n, start, stop, stride, expected):
    path = write_clip(tmp_path / "clip.mp4", n)
    clip = read_clip(path, start=start, stop=stop, stride=stride, keep_last=True)
    assert clip.indices == expected and clip.frame_count == n
    every = read_clip(path)
    assert all(np.array_equal(f, every.frames[i]) for f, i in zip(clip.frames, clip.indices, strict=True))
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(every.frames):
        Image.fromarray(frame).save(folder / f"{t}.png")
    assert read_clip(folder, start=start, stop=stop, stride=stride, keep_last=True).indices == expected
    plain = [i for i in range(start, stop or n) if i % stride == 0]
    if plain:  # without keep_last, only the stride's frames
        assert read_clip(path, start=start, stop=stop, stride=stride).indices == plain
    else:
        with pytest.raises(VideoError, match="holds no frames from frame 11"):
            read_clip(path, start=start, stop=stop, stride=stride)


def test_last_frame_counts_against_max_frames(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 12)
    assert len(read_clip(path, stride=5, max_frames=3)) == 3
    with pytest.raises(VideoError, match="more than 3 frames to read"):
        read_clip(path, stride=5, max_frames=3, keep_last=True)
