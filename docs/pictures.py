"""The README's pictures of usam's outputs, made by usam's own code paths; where the geometry must show, with
the tests' geometric ORACLEs in place of SAM (random weights make masks that are noise).

    .venv/bin/python docs/pictures.py            # docs/img/refine-viz.png, docs/img/video-viz.png
    .venv/bin/python docs/pictures.py --browser  # also docs/img/editor-video-track.png, from the screenshots
                                                 # the video browser test left (run first if there are none)

- ``refine-viz.png``: what ``usam refine --viz`` writes (``refine_folder`` with ``viz=True``: image | coarse map
  | refined map) for a synthetic scene of ``tests/refine_oracle.py`` whose coarse map is shifted by (6, -5) px,
  SAM being :class:`refine_oracle.GeometricOracle` and its mask generator :class:`refine_oracle.OracleGenerator`.
- ``video-viz.png``: four frames of what ``usam video --box ... --viz`` writes (``followed_tracks`` and
  ``run_video``, the overlay of ``overlay_frames``) for ``video_scenes.moving_shapes``, each object given by its
  box on frame 0, SAM being :class:`video_scenes.VideoOracle`.
- ``editor-video-track.png``: Label Studio's player on two frames of the landscape clip and one of the portrait
  clip, cropped from ``test_a_video_track_is_drawn_over_the_moving_object_on_each_frame``'s screenshots (the
  track made by usam's video job with the test's colour oracle as the head's segmenter).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "img"
sys.path.insert(0, str(ROOT / "tests"))

from refine_oracle import GeometricOracle, OracleGenerator, corrupt, scene  # noqa: E402
from video_scenes import VideoOracle, moving_shapes  # noqa: E402

from usam_backend.tools.evaluate import miou  # noqa: E402
from usam_backend.tools.refine_files import refine_folder  # noqa: E402
from usam_backend.tools.video_files import ClipReader, Keyframe, followed_tracks, overlay_frames, run_video  # noqa: E402

SCREENSHOTS = ROOT / "tests" / "artifacts" / "browser"
VIDEO_TEST = "test_a_video_track_is_drawn_over_the_moving_object_on_each_frame"
PLAYER = (481 - 12, 284 - 12, 721 + 12, 524 + 12)  # the player's frame (both clips) and a margin, in a screenshot


def enlarged(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def refine_picture(folder: Path, seed: int = 0) -> Path:
    """``usam refine --viz``'s picture for one oracle scene with a shifted coarse map; prints both maps' mIoU."""
    image, instances, semantic = scene(seed)
    coarse = corrupt(semantic, "shifted", seed)
    for name, array in (("data", image), ("masks", coarse)):
        (folder / name).mkdir()
        Image.fromarray(array).save(folder / name / "scene.png")
    refine_folder(folder / "data", folder / "masks", folder / "out", GeometricOracle(instances),
                  generator=OracleGenerator(instances), viz=True, progress=False)  # fmt: skip
    with Image.open(folder / "out" / "scene.png") as refined:
        print(f"refine: mIoU {miou(coarse, semantic):.3f} coarse, {miou(np.asarray(refined), semantic):.3f} refined")
    with Image.open(folder / "out" / "viz" / "scene.png") as viz:
        return save(enlarged(viz.convert("RGB"), 2), "refine-viz.png")


def video_picture(folder: Path, shown: tuple[int, ...] = (0, 10, 20, 29)) -> Path:
    """``usam video --box ... --viz``'s overlay on four frames of the oracle's scene."""
    clip_scene = moving_shapes(30)
    frames = folder / "frames"
    frames.mkdir()
    for t, frame in enumerate(clip_scene.frames):  # PNG frames: the oracle knows each frame by its bytes
        Image.fromarray(frame).save(frames / f"{t:05d}.png")
    clip = ClipReader.open(frames, max_frames=1000, max_pixels=10_000_000, fps=None)
    oracle = VideoOracle(clip_scene)
    boxes = clip_scene.boxes(0)
    keyframes = [Keyframe(0, tuple(float(v) for v in boxes[k]), label) for k, label in ((1, "disc"), (2, "square"),
                                                                                         (3, "ellipse"))]  # fmt: skip
    followed: dict[int, dict[int, np.ndarray]] = {}
    out = folder / "out"
    run = run_video(clip, lambda: followed_tracks(clip, keyframes, oracle, followed), oracle, out,
                    source={"picture": True}, followed=followed, progress=False)  # fmt: skip
    overlays = dict(zip(range(clip.frame_count), overlay_frames(clip, out, run.tracks), strict=True))
    gap = np.full((clip_scene.frames[0].shape[0], 6, 3), 255, dtype=np.uint8)
    strip = np.hstack([part for t in shown for part in (overlays[t], gap)][:-1])
    return save(enlarged(Image.fromarray(strip), 2), "video-viz.png")


def browser_picture() -> Path:
    """Two frames of the landscape clip and one of the portrait clip, as the browser test saw them."""
    shots = [
        SCREENSHOTS / f"{VIDEO_TEST}_landscape_" / "00-frame-01.png",
        SCREENSHOTS / f"{VIDEO_TEST}_landscape_" / "02-frame-21.png",
        SCREENSHOTS / f"{VIDEO_TEST}_portrait_" / "01-frame-11.png",
    ]
    if not all(path.exists() for path in shots):
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py", "-k",
                        VIDEO_TEST], cwd=ROOT, check=True)  # fmt: skip
    parts = []
    for path in shots:
        with Image.open(path) as shot:
            parts.append(np.asarray(shot.convert("RGB").crop(PLAYER)))
    gap = np.full((parts[0].shape[0], 8, 3), 255, dtype=np.uint8)
    picture = Image.fromarray(np.hstack([parts[0], gap, parts[1], gap, parts[2]]))
    return save(picture.quantize(64), "editor-video-track.png")  # the scene's noise: 64 colours keep it small


def save(image: Image.Image, name: str) -> Path:
    path = IMAGES / name
    image.save(path, format="PNG", optimize=True)
    size = path.stat().st_size
    assert size < 200_000, f"{path} is {size:,} bytes"
    print(f"{path.relative_to(ROOT)}: {image.width}x{image.height}, {size / 1000:.0f} kB")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--browser", action="store_true", help="run the video browser test and crop its screenshots")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "refine").mkdir()
        (Path(work) / "video").mkdir()
        refine_picture(Path(work) / "refine")
        video_picture(Path(work) / "video")
    if args.browser:
        browser_picture()


if __name__ == "__main__":
    main()
