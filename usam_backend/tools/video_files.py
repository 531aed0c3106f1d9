"""``usam video``: a clip in; per-frame indexed PNGs, one JSON of tracks and a picture to watch out.

Outputs in ``--out DIR``:

- ``DIR/<frame>.png`` (``00000.png``, ...; a frame folder's own names): one per frame, DAVIS-style: a palette PNG
  whose pixel values are track ids (0: nothing), so ``usam eval video`` and DAVIS tools read it;
- ``DIR/tracks.json``: the clip (name, fps, frame count, size) and per track its id, label, score
  and per frame its box (xyxy pixels), detection score (null where interpolated) and COCO RLE;
- ``DIR/viz.mp4`` with ``--viz`` (``viz.gif`` with ``--viz gif``): the masks over the clip.

Tracks come from a head (the class names path), from objects given as boxes on one frame each
(``--box FRAME:X0,Y0,X1,Y1[:LABEL]``, followed through the clip), or from a tracks file: UVOSAM's JSON (a list of
``{"video_id", "boxes": [xyxy or null per frame], "score", "category_id"}``), usam's own
``tracks.json``, or MOT-challenge text (``frame,id,x,y,w,h,score,...``, 1-based frames and pixels; its ids are
kept when they are 1-255, else tracks are renumbered in order of appearance).

Every file is written atomically; frames already written are read back instead of segmented again,
so a stopped run resumes (the tracks are kept in ``DIR/tracks-boxes.json`` meanwhile). With ``--head``
the objects are found in the same single pass that segments the frames
(:func:`~usam_backend.systems.uvosam.video_objects`), so a run stopped before its ``tracks.json`` is
written starts again; a finished one is not redone.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from training.head import Head
from usam_backend.core.errors import ConfigurationError, DataError
from usam_backend.core.fileio import atomic_path
from usam_backend.core.masks import mask_to_rle, rle_to_mask
from usam_backend.core.settings import Settings
from usam_backend.core.video import EmptyRange, VideoError, frame_folder, read_clip, write_video
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.predictor import EnginePredictor
from usam_backend.systems.uosam import Predictor
from usam_backend.systems.usam import SemanticSegmenter
from usam_backend.systems.uvosam import (
    Track,
    TrackOptions,
    follow_objects,
    head_detector,
    mask_box,
    name_tracks,
    paint,
    sampled_frames,
    segment_frames,
    tracks_from_masks,
    video_objects,
)
from usam_backend.tools.viz import class_colors

FORMAT = "usam-video-tracks/1"


def palette() -> list[int]:
    """DAVIS's (PASCAL VOC's) palette: id k's colour from the bits of k."""
    out = []
    for k in range(256):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out += [r, g, b]
    return out


def indexed_png(ids: np.ndarray) -> Image.Image:
    """A map of track ids (< 256) as a palette PNG."""
    image = Image.fromarray(ids.astype(np.uint8)).convert("P")
    image.putpalette(palette())
    return image


# --- tracks files ---------------------------------------------------------------------------


def read_tracks(
    path: Path, *, video: str | None = None, frame_count: int | None = None, prefer: str | None = None
) -> dict[int, Track]:
    """Tracks from a file (see the module docs), numbered 1, 2, ... in the file's order.

    Args:
        video: which video of a multi-video UVOSAM file (its ``video_id``); default: the only one,
            or ``prefer`` (e.g. the clip's name) when the file has several.
        frame_count: frames of the clip; boxes beyond it are an error.

    Raises:
        DataError: unreadable, not one of the formats, boxes that are not [x0, y0, x1, y1] with
            x0 < x1 and y0 < y1, frames out of range, or a video the file does not hold.
    """
    if not path.is_file():
        raise DataError(f"the tracks file {path} does not exist")
    text = path.read_text(errors="replace")
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        try:
            tracks = _from_usam(raw, path) if isinstance(raw, dict) else _from_uvosam(raw, path, video, prefer)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: a track lacks a field or has one of the wrong type ({exc!r})") from None
    else:
        tracks = _from_mot(text, path)
    check_track_ids(tracks, str(path))
    for track in tracks.values():
        for frame, box in track.boxes.items():
            if frame < 0 or (frame_count is not None and frame >= frame_count):
                raise DataError(f"{path}: track {track.id} has a box on frame {frame}, outside the clip")
            if not (np.isfinite(box).all() and box[0] < box[2] and box[1] < box[3]):
                raise DataError(f"{path}: track {track.id}, frame {frame}: {box.tolist()} is not an xyxy box")
    return tracks


def _from_uvosam(raw: Any, path: Path, video: str | None, prefer: str | None) -> dict[int, Track]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("boxes"), list) for t in raw):
        raise DataError(f"{path}: a UVOSAM tracks file is a list of {{'video_id', 'boxes': [...]}} objects")
    videos = list(dict.fromkeys(str(t.get("video_id", "")) for t in raw))
    if video is None and len(videos) > 1 and prefer in videos:
        video = prefer
    if video is None and len(videos) > 1:
        raise DataError(f"{path} holds tracks of {len(videos)} videos ({', '.join(videos[:5])}); say which")
    wanted = videos[0] if video is None and videos else video
    tracks: dict[int, Track] = {}
    for t in raw:
        if str(t.get("video_id", "")) != wanted:
            continue
        track = Track(len(tracks) + 1, class_id=int(t.get("category_id", -1)))
        score = float(t.get("score", 1.0))
        for frame, box in enumerate(t["boxes"]):
            if box is not None:
                track.boxes[frame] = _box(box, path)
                track.scores[frame] = score
        tracks[track.id] = track
    if not tracks:
        raise DataError(f"{path} holds no tracks of video '{video}' (it has: {', '.join(videos[:5])})")
    return tracks


def _from_usam(raw: dict[str, Any], path: Path) -> dict[int, Track]:
    if raw.get("format") != FORMAT or not isinstance(raw.get("tracks"), list):
        raise DataError(f"{path}: a usam tracks file has format '{FORMAT}' and a list of tracks")
    tracks = {}
    for t in raw["tracks"]:
        track = Track(int(t["id"]), class_id=int(t.get("class_id", -1)), label=str(t.get("label") or ""))
        for entry in t.get("frames", []):
            track.boxes[int(entry["frame"])] = _box(entry["box"], path)
            if entry.get("score") is not None:
                track.scores[int(entry["frame"])] = float(entry["score"])
        tracks[track.id] = track
    return tracks


def _from_mot(text: str, path: Path) -> dict[int, Track]:
    tracks: dict[int, Track] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.replace(" ", ",").split(",") if f.strip()]
        try:
            frame, tid, x, y, w, h = int(float(fields[0])), int(float(fields[1])), *map(float, fields[2:6])
            score = float(fields[6]) if len(fields) > 6 else 1.0
        except (ValueError, IndexError):
            raise DataError(f"{path}, line {number}: MOT lines are 'frame,id,x,y,w,h[,score,...]'") from None
        if tid < 0:
            continue  # MOT detections without an id
        track = tracks.setdefault(tid, Track(tid))
        track.boxes[frame - 1] = np.array([x - 1, y - 1, x - 1 + w, y - 1 + h])  # MOT's pixels are 1-based too
        track.scores[frame - 1] = score if score >= 0 else 1.0
    if not tracks:
        raise DataError(f"{path} holds no MOT track lines")
    for track in tracks.values():
        track.boxes = dict(sorted(track.boxes.items()))
    if all(1 <= tid <= 255 for tid in tracks):
        return dict(sorted(tracks.items()))  # the file's ids, as they fit a palette PNG
    renumbered = {}
    for number, tid in enumerate(sorted(tracks, key=lambda t: (min(tracks[t].boxes), t)), start=1):
        tracks[tid].id = number
        renumbered[number] = tracks[tid]
    return renumbered


def _box(box: Any, path: Path) -> np.ndarray:
    try:
        out = np.asarray(box, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {str(box)[:80]} is not a box [x0, y0, x1, y1]") from None
    return out


def check_track_ids(tracks: dict[int, Track], where: str) -> None:
    """Track ids must fit a palette PNG: 1-255, at most 255 tracks."""
    bad = [tid for tid in tracks if not 1 <= int(tid) <= 255]
    if bad:
        raise DataError(f"{where}: track ids must be 1-255 (a palette PNG's values), got {bad[:5]}")


# --- usam video -------------------------------------------------------------------------------


@dataclass
class ClipReader:
    """A clip read in chunks of ``chunk`` frames, so that a long clip is never held in memory.

    Attributes:
        source: a video file or a frame folder.
        fps, frame_count, name, width, height: the clip's (``frame_count`` is updated to the real
            count once the last chunk is read).
        names: a frame folder's file names (stems), in frame order; None for a video file.
    """

    source: Path
    fps: float
    frame_count: int
    name: str
    width: int
    height: int
    names: list[str] | None
    max_frames: int
    max_pixels: int
    folder_fps: float | None = None
    chunk: int = 64

    @classmethod
    def open(cls, path: Path, *, max_frames: int, max_pixels: int, fps: float | None = None) -> ClipReader:
        """Reads the first frame and the clip's length (a container's stated length, checked
        against ``max_frames``)."""
        first = read_clip(path, stop=1, max_frames=1, max_pixels=max_pixels, fps=fps)
        if first.frame_count > max_frames:
            raise DataError(
                f"{first.name}: more than {max_frames:,} frames to read (USAM_VIDEO_MAX_FRAMES); cut it or raise it"
            )
        names = [f.stem for f in frame_folder(path)] if path.is_dir() else None
        height, width = first.frames[0].shape[:2]
        return cls(path, first.fps, first.frame_count, first.name, width, height, names, max_frames, max_pixels, fps)

    def frames(self, stride: int = 1, *, keep_last: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(frame index, HxWx3 RGB frame) of every ``stride``-th frame (and, with ``keep_last``,
        the last), decoded chunk by chunk; the last chunk reads to the clip's real end."""
        start = 0
        while True:
            stop = start + self.chunk * stride
            last = stop >= self.frame_count
            try:
                clip = read_clip(self.source, start=start, stop=None if last else stop, stride=stride,
                                 keep_last=keep_last and last, max_frames=self.max_frames,
                                 max_pixels=self.max_pixels, fps=self.folder_fps)  # fmt: skip
            except EmptyRange:
                return
            if last:
                self.frame_count = clip.frame_count or self.frame_count  # the real count, read to the end
            yield from zip(clip.indices, clip.frames, strict=True)
            if last:
                return
            start = stop

    def file_name(self, index: int) -> str:
        """The PNG name of frame ``index``: a frame folder's own name, else ``00000``, ``00001``, ..."""
        return self.names[index] if self.names is not None else f"{index:05d}"


@dataclass
class VideoRun:
    frames_segmented: int = 0
    frames_reused: int = 0
    tracks: dict[int, Track] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)


ObjectMaps = Callable[[Iterator[np.ndarray], Iterator[int], dict[int, Track]], Iterator[np.ndarray]]
"""Frames (and their indices, each known once its frame is read) in, id maps out in one pass, the
tracks filled in as they are painted (the head's path: :func:`~usam_backend.systems.uvosam.video_objects`)."""


def run_video(
    clip: ClipReader, tracks_for: Callable[[], dict[int, Track]] | None, predictor: Predictor, out: Path, *,
    source: dict[str, Any], viz: str | None = None, overwrite: bool = False, progress: bool = True,
    followed: dict[int, dict[int, np.ndarray]] | None = None, objects: ObjectMaps | None = None,
) -> VideoRun:  # fmt: skip
    """Segment ``clip`` by tracks into ``out`` (see the module docs), frames streaming in and id maps
    out: memory does not grow with the clip's length.

    Args:
        tracks_for: computes the tracks (called only when ``out`` has none for the same ``source``).
        source: what the tracks came from (input, head or tracks file, stride): a resumed run reuses
            the saved tracks only if it matches.
        viz: "mp4" or "gif" to also write the overlay video.
        followed: frame index -> {track id: mask} that ``tracks_for`` already found (objects
            followed from keyframes): painted as they are, not segmented again. Frames it lacks are
            segmented from the tracks' boxes (a resumed run).
        objects: instead of ``tracks_for``, finds the objects and their masks in one pass over the
            clip (the head's path). A run stopped before its ``tracks.json`` is written starts again.
    """
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "tracks-boxes.json"
    tracks = None
    for earlier in (saved, out / "tracks.json"):
        if tracks is None and earlier.exists() and not overwrite:
            try:
                kept = json.loads(earlier.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(kept, dict) and kept.get("source") == source:
                tracks = _from_usam(kept, earlier)
    one_pass = tracks is None and objects is not None
    if tracks is None:
        for stale in out.glob("[0-9]*.png"):
            stale.unlink()
        if objects is not None:
            tracks = {}
        else:
            assert tracks_for is not None
            tracks = tracks_for()
            with atomic_path(saved) as tmp:
                tmp.write_text(json.dumps(tracks_document(clip, tracks, None, source)))
    check_track_ids(tracks, "the tracks")
    run = VideoRun(tracks=tracks)
    rles: dict[int, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    order: list[int] = []

    def stream() -> Iterator[np.ndarray]:
        for index, frame in clip.frames():
            order.append(index)
            yield frame

    def done(position: int) -> np.ndarray | None:
        path = out / f"{clip.file_name(order[position])}.png"
        if not path.exists():
            return None
        with Image.open(path) as png:
            return np.asarray(png).astype(np.uint8)

    indices = (order[i] for i in itertools.count())
    if one_pass:
        assert objects is not None
        maps: Iterator[np.ndarray] = objects(stream(), indices, tracks)
    elif followed is not None and followed:
        maps = (_painted_followed(frame, followed.pop(order[p], {})) for p, frame in enumerate(stream()))
    else:
        maps = segment_frames(stream(), tracks, predictor, frame_indices=indices, known=done)
    bar = tqdm(total=clip.frame_count, desc="segmenting", unit="frame", disable=not progress)
    for position, ids in enumerate(maps):
        index = order[position]
        path = out / f"{clip.file_name(index)}.png"
        if path.exists():
            run.frames_reused += 1
        else:
            with atomic_path(path) as tmp:
                indexed_png(ids).save(tmp, format="PNG")
            run.frames_segmented += 1
        for tid in np.unique(ids[ids > 0]):
            rles[int(tid)][index] = mask_to_rle(ids == tid)
        bar.update(1)
    bar.close()
    check_track_ids(tracks, "the tracks")
    document = tracks_document(clip, tracks, rles, source)
    with atomic_path(out / "tracks.json") as tmp:
        tmp.write_text(json.dumps(document))
    run.outputs.append(out / "tracks.json")
    if viz:
        target = out / f"viz.{viz}"
        with atomic_path(target) as tmp:
            write_video(tmp, overlay_frames(clip, out, tracks), clip.fps, kind=viz)
        run.outputs.append(target)
    saved.unlink(missing_ok=True)
    return run


def _painted_followed(frame: np.ndarray, masks: dict[int, np.ndarray]) -> np.ndarray:
    ids = np.zeros(frame.shape[:2], dtype=np.uint8 if max(masks, default=0) < 256 else np.int32)
    return paint(ids, [(int(m.sum()), tid, m) for tid, m in masks.items()])


def tracks_document(
    clip: ClipReader, tracks: dict[int, Track], rles: dict[int, dict[int, dict[str, Any]]] | None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``tracks.json``: the clip, and each track's per-frame box, score and (with ``rles``: track id
    -> frame index -> COCO RLE) mask. A frame where SAM followed the object past its boxes gets the
    box of its mask and no score."""
    document: dict[str, Any] = {
        "format": FORMAT,
        "video": {"name": clip.name, "fps": clip.fps, "frame_count": clip.frame_count, "width": clip.width,
                  "height": clip.height},
        "source": source,
        "tracks": [],
    }  # fmt: skip
    for tid, track in sorted(tracks.items()):
        masks = (rles or {}).get(tid, {})
        frames = []
        for frame in sorted({*track.boxes, *masks}):
            box = track.boxes[frame] if frame in track.boxes else mask_box(rle_to_mask(masks[frame]))
            entry: dict[str, Any] = {"frame": frame, "box": [round(float(v), 2) for v in box],
                                     "score": track.scores.get(frame)}  # fmt: skip
            if rles is not None:
                entry["rle"] = masks.get(frame) or mask_to_rle(np.zeros((clip.height, clip.width), dtype=bool))
            frames.append(entry)
        document["tracks"].append(
            {
                "id": tid,
                "label": track.label,
                "class_id": track.class_id,
                "score": round(track.score, 4),
                "frames": frames,
            }
        )
    return document


def overlay_frames(clip: ClipReader, out: Path, tracks: dict[int, Track], alpha: float = 0.5) -> Iterator[np.ndarray]:
    """Frames with each track's mask (read back from its PNG) in its colour, its box and ``id label``
    written at its top, one at a time."""
    colors = np.vstack([[0, 0, 0], class_colors(max([*tracks, 1]))]).astype(np.float32)
    for index, frame in clip.frames():
        with Image.open(out / f"{clip.file_name(index)}.png") as png:
            ids = np.asarray(png)
        shown = frame.astype(np.float32)
        painted = ids > 0
        shown[painted] = (1 - alpha) * shown[painted] + alpha * colors[np.minimum(ids[painted], len(colors) - 1)]
        image = Image.fromarray(shown.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for tid, track in tracks.items():
            if index in track.boxes:
                x0, y0, x1, y1 = (float(v) for v in track.boxes[index])
                color = tuple(int(c) for c in colors[min(tid, len(colors) - 1)])
                draw.rectangle((x0, y0, x1, y1), outline=color)
                draw.text((x0 + 2, y0 + 1), f"{tid} {track.label}".strip(), fill=color)
        draw.text((4, 2), f"frame {index}", fill=(255, 255, 255))
        yield np.asarray(image)


@dataclass(frozen=True)
class Keyframe:
    """An object given on one frame: ``FRAME:X0,Y0,X1,Y1[:LABEL]`` (0-based frame, xyxy pixels)."""

    frame: int
    box: tuple[float, float, float, float]
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> Keyframe:
        parts = text.split(":", 2)
        try:
            frame = int(parts[0])
            x0, y0, x1, y1 = (float(v) for v in parts[1].split(","))
        except (ValueError, IndexError):
            raise ConfigurationError(
                f"--box {text!r}: expected FRAME:X0,Y0,X1,Y1[:LABEL], e.g. 0:10,20,110,90:dog"
            ) from None
        if frame < 0 or not (x0 < x1 and y0 < y1):
            raise ConfigurationError(f"--box {text!r}: the frame must be 0 or more and the box x0 < x1, y0 < y1")
        return cls(frame, (x0, y0, x1, y1), parts[2] if len(parts) > 2 else "")


def followed_tracks(
    clip: ClipReader, keyframes: list[Keyframe], predictor: Predictor, masks: dict[int, dict[int, np.ndarray]]
) -> dict[int, Track]:
    """One track per keyframe, the objects followed through the clip together
    (:func:`~usam_backend.systems.uvosam.follow_objects`: one encoder pass per frame when the
    keyframes share a frame). Their masks are put in ``masks`` (frame index -> {track id: mask}).
    This path holds the clip's frames (it follows both ways from the keyframes)."""
    pairs = list(clip.frames())
    indices = [index for index, _ in pairs]
    position = {index: i for i, index in enumerate(indices)}
    for key in keyframes:
        if key.frame not in position:
            raise DataError(f"--box on frame {key.frame}: the clip has frames 0-{clip.frame_count - 1}")
    starts = {number: (position[key.frame], key.box) for number, key in enumerate(keyframes, start=1)}
    with tqdm(total=len(pairs), desc=f"following {len(keyframes)} object(s)", unit="frame") as bar:
        found = follow_objects([frame for _, frame in pairs], starts, predictor, progress=bar.update)
    del pairs
    tracks = tracks_from_masks(found, indices)
    for number, key in enumerate(keyframes, start=1):
        tracks[number].label = key.label
        for at, mask in found[number].items():
            masks.setdefault(indices[at], {})[number] = mask
    return tracks


def video_command(
    settings: Settings, path: Path, out: Path, *, head: Path | None = None, tracks: Path | None = None,
    boxes: list[str] | None = None, video_id: str | None = None, fps: float | None = None, viz: str | None = None,
    overwrite: bool = False,
) -> VideoRun:  # fmt: skip
    """``usam video``: read the clip, get its tracks from ``head``, ``tracks`` or keyframe ``boxes``,
    segment every frame."""
    if sum(x is not None for x in (head, tracks, boxes)) != 1:
        raise ConfigurationError("usam video needs one of --head, --tracks or --box")
    keyframes = [Keyframe.parse(b) for b in boxes or []]
    if not path.exists():
        raise DataError(f"{path} does not exist")
    try:
        clip = ClipReader.open(path, max_frames=settings.video_max_frames, max_pixels=settings.max_image_pixels,
                               fps=fps)  # fmt: skip
    except VideoError as exc:
        raise DataError(str(exc)) from None
    loaded = Head.load(head) if head is not None else None
    if loaded is not None and loaded.sam_type and loaded.sam_type != settings.sam_type:
        settings = settings.replace(sam_type=loaded.sam_type)  # follow the head
    engine = SamEngine.from_settings(settings)
    stride = settings.video_stride
    source: dict[str, Any] = {"input": str(path.resolve()), "frames": clip.frame_count}
    if loaded is not None:
        source.update(head=loaded.version, stride=stride)
    elif tracks is not None:
        source.update(tracks=str(tracks.resolve()), modified=tracks.stat().st_mtime if tracks.exists() else None)
    else:
        source.update(boxes=list(boxes or []))
    followed: dict[int, dict[int, np.ndarray]] = {}

    def tracks_for() -> dict[int, Track]:
        if keyframes:
            return followed_tracks(clip, keyframes, EnginePredictor(engine), followed)
        if loaded is None:
            assert tracks is not None
            return read_tracks(tracks, video=video_id, prefer=path.stem, frame_count=clip.frame_count)
        raise AssertionError("the head's path finds its objects in one pass")

    objects: ObjectMaps | None = None
    if loaded is not None:
        segmenter = SemanticSegmenter.from_settings(engine, loaded, settings)
        sampled = len(sampled_frames(0, clip.frame_count, stride))

        def objects(
            frames: Iterator[np.ndarray], indices: Iterator[int], found: dict[int, Track]
        ) -> Iterator[np.ndarray]:
            yield from video_objects(frames, head_detector(segmenter), EnginePredictor(engine), stride=stride,
                                     frame_indices=indices, min_hits=min(TrackOptions.min_hits, sampled),
                                     tracks=found)  # fmt: skip
            name_tracks(found, segmenter.class_names)

    return run_video(clip, tracks_for, EnginePredictor(engine), out, source=source, viz=viz, overwrite=overwrite,
                     followed=followed, objects=objects)  # fmt: skip
