"""Synthetic videos for the UVOSAM tests: shapes that move, cross, occlude and leave the frame, with
their true per-frame object maps, and a geometric ORACLE with SamPredictor's interface over them.

The oracle is a measuring instrument for the algorithms around SAM (tracking, segmenting by track,
following an object), not a stand-in for the model: a box prompt answers with the part inside the box
of the visible object it covers most, so a late, shifted or shrunken box costs what it would cost
with SAM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

H, W = 96, 128


@dataclass
class Scene:
    frames: list[np.ndarray]  # HxWx3 uint8 RGB
    objects: list[np.ndarray]  # HxW int32 per frame: object id (1..K) of the visible object, 0 background
    classes: dict[int, int]  # object id -> class id

    def boxes(self, t: int) -> dict[int, np.ndarray]:
        """The true xyxy box of every object visible on frame t."""
        out = {}
        for k in np.unique(self.objects[t]):
            if k:
                ys, xs = np.nonzero(self.objects[t] == k)
                out[int(k)] = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        return out


def moving_shapes(n_frames: int = 30, seed: int = 0) -> Scene:
    """Three objects: a disc and a square that cross (the square passes in front), and a small
    ellipse that leaves through the right edge two thirds of the way through."""
    rng = np.random.default_rng(seed)
    colors = {k: rng.integers(40, 255, size=3) for k in (1, 2, 3)}
    frames, objects = [], []
    for t in range(n_frames):
        a = t / max(1, n_frames - 1)
        image = np.full((H, W, 3), 90, dtype=np.uint8)
        image[::8] = 100  # a little texture
        ids = np.zeros((H, W), dtype=np.int32)
        layers = [
            (1, "disc", (int(20 + 85 * a), 40), 14),  # moves right
            (3, "ellipse", (int(60 + 100 * a), 78), 9),  # leaves to the right
            (2, "square", (int(108 - 85 * a), 46), 12),  # moves left, drawn last: in front
        ]
        for k, kind, (cx, cy), r in layers:
            shape = np.zeros((H, W), dtype=np.uint8)
            if kind == "disc":
                cv2.circle(shape, (cx, cy), r, 1, -1)
            elif kind == "ellipse":
                cv2.ellipse(shape, (cx, cy), (r + 5, r - 2), 20, 0, 360, 1, -1)
            else:
                shape[cy - r : cy + r, cx - r : cx + r] = 1
            region = shape.astype(bool)
            ids[region] = k
            image[region] = colors[k]
        frames.append(image)
        objects.append(ids)
    return Scene(frames, objects, {1: 0, 2: 1, 3: 0})


def _bounce(start: float, speed: float, low: float, high: float, t: float) -> float:
    """A coordinate moving at ``speed`` from ``start`` and bouncing between ``low`` and ``high``."""
    span = high - low
    x = (start - low + speed * t) % (2 * span)
    return low + (x if x <= span else 2 * span - x)


def _render(n_frames: int, layers, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames and object maps of ``layers``: (id, kind, radius, colour or None, centre(t) -> (x, y)),
    drawn in order (the last in front); a colour None is drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    frames, objects = [], []
    colors = {k: (np.asarray(c) if c is not None else rng.integers(40, 255, size=3)) for k, _, _, c, _ in layers}
    for t in range(n_frames):
        image = np.full((H, W, 3), 90, dtype=np.uint8)
        image[::8] = 100
        ids = np.zeros((H, W), dtype=np.int32)
        for k, kind, r, _, centre in layers:
            cx, cy = (round(float(v)) for v in centre(t))
            shape = np.zeros((H, W), dtype=np.uint8)
            if kind == "disc":
                cv2.circle(shape, (cx, cy), r, 1, -1)
            elif kind == "ellipse":
                cv2.ellipse(shape, (cx, cy), (r + 4, r - 2), 20, 0, 360, 1, -1)
            else:
                shape[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = 1
            region = shape.astype(bool)
            ids[region] = k
            image[region] = colors[k]
        frames.append(image)
        objects.append(ids)
    return frames, objects


def fast_shapes(n_frames: int = 24, seed: int = 0) -> Scene:
    """Three small objects (16-20 px) moving 5-7 px a frame, about two of their sizes between two
    frames 5 apart, bouncing off the edges and crossing each other."""
    layers = [
        (1, "disc", 8, None, lambda t: (_bounce(15, 6, 8, W - 8, t), _bounce(20, 3.5, 8, H - 8, t))),
        (3, "ellipse", 9, None, lambda t: (_bounce(60, 3, 12, W - 12, t), _bounce(48, -6, 8, H - 8, t))),
        (2, "square", 8, None, lambda t: (_bounce(110, -5.5, 8, W - 8, t), _bounce(70, -3, 8, H - 8, t))),
    ]
    frames, objects = _render(n_frames, layers, seed)
    return Scene(frames, objects, {1: 0, 2: 1, 3: 0})


def twins(n_frames: int = 24, seed: int = 0) -> Scene:
    """Two discs of one size, one class and one colour that cross (the first in front), 4 px a frame
    each way: only their motion tells them apart."""
    color = np.array([200, 120, 60])
    layers = [
        (2, "disc", 10, color, lambda t: (108 - 4.0 * t, 52)),
        (1, "disc", 10, color, lambda t: (20 + 4.0 * t, 44)),
    ]
    frames, objects = _render(n_frames, layers, seed)
    return Scene(frames, objects, {1: 0, 2: 0})


def pause_and_bounce(n_frames: int = 30, seed: int = 0) -> Scene:
    """A disc that moves right, pauses for 8 frames and comes back, and a square bouncing between
    the top and the bottom at 7 px a frame (a turn every 10 frames)."""

    def shuttle(t: float) -> tuple[float, float]:
        x = 20 + 5 * min(t, 8) - 5 * max(0, t - 16)
        return x, 30

    layers = [
        (1, "disc", 10, None, shuttle),
        (2, "square", 9, None, lambda t: (96, _bounce(20, 7, 9, H - 9, t))),
    ]
    frames, objects = _render(n_frames, layers, seed)
    return Scene(frames, objects, {1: 0, 2: 1})


SCENES = {
    "slow (moving_shapes)": lambda: moving_shapes(30),
    "fast, bouncing": fast_shapes,
    "twins crossing": twins,
    "pause and bounce": pause_and_bounce,
}
"""The oracle scenes of the README's table, by name."""


def noisy_detections(
    scene: Scene, seed: int = 0, *, jitter: float = 2.0, miss: float = 0.1, false_positives: float = 0.15
):
    """Detector output from the true boxes: jittered corners, missed detections, one-frame false
    positives, and a class flipped now and then (10 %)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(len(scene.frames)):
        boxes, scores, classes = [], [], []
        for k, box in scene.boxes(t).items():
            if rng.random() < miss:
                continue
            boxes.append(box + rng.normal(0, jitter, size=4))
            scores.append(rng.uniform(0.5, 0.95))
            cls = scene.classes[k]
            classes.append(1 - cls if rng.random() < 0.1 else cls)
        if rng.random() < false_positives:
            x, y = rng.uniform(0, W - 20), rng.uniform(0, H - 20)
            boxes.append(np.array([x, y, x + 15, y + 15]))
            scores.append(rng.uniform(0.2, 0.5))
            classes.append(0)
        out.append((np.array(boxes).reshape(-1, 4), np.array(scores), np.array(classes, dtype=int)))
    return out


def box_pixels(box: np.ndarray | Sequence[float], shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool: the pixels an xyxy box (pixel edges, rounded) covers."""
    x0, y0, x1, y1 = (int(np.round(v)) for v in np.asarray(box, dtype=np.float64).reshape(4))
    inside = np.zeros(shape[:2], dtype=bool)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return inside


def prompt_answer(objects: np.ndarray, points=None, labels=None, box=None) -> np.ndarray:
    """The (H, W) bool mask SAM gives a prompt, geometrically, on an image whose visible objects are
    ``objects`` ((H, W) int ids, 0 background):

    - a negative point removes the object under it;
    - a positive point gives the object under it (the first such point that is not removed);
    - a box alone gives the object with the most visible pixels in it (of two overlapping objects,
      the one in front);
    - and a box gives only the part of that object inside the box, so a late, shifted or shrunken
      box costs what it would cost with SAM.

    ``points``: (n, 2) XY pixels; ``labels``: (n,) 1 positive, 0 negative; ``box``: (4,) XYXY pixels."""
    height, width = objects.shape
    xy = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
    signs = np.zeros(0, int) if labels is None else np.asarray(labels, dtype=int).reshape(-1)
    on = [(x, y, sign) for (x, y), sign in zip(xy, signs, strict=True) if 0 <= x < width and 0 <= y < height]
    under = [(int(objects[int(y), int(x)]), sign) for x, y, sign in on]  # (object id, 1 or 0)
    removed = {k for k, label in under if label == 0}
    target = next((k for k, label in under if label == 1 and k and k not in removed), 0)
    inside = np.ones(objects.shape, dtype=bool) if box is None else box_pixels(box, objects.shape)
    if not target and box is not None:
        ids, counts = np.unique(objects[inside], return_counts=True)
        counts[(ids == 0) | np.isin(ids, list(removed))] = 0
        target = int(ids[np.argmax(counts)]) if counts.size and counts.max() else 0
    return (objects == target) & inside if target else np.zeros(objects.shape, dtype=bool)


def multimask_answers(whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAM's three masks for an ambiguous prompt, (3, H, W) bool, and their scores (3,): the left
    half of the answer (a part), the answer, and the answer grown into its surroundings, scored so
    the answer ranks first."""
    part = whole.copy()
    if whole.any():
        xs = np.nonzero(whole)[1]
        part[:, (xs.min() + xs.max() + 1) // 2 :] = False
    grown = cv2.dilate(whole.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    return np.stack([part, whole, grown]), np.array([0.6, 0.95, 0.5], dtype=np.float32)


def low_res_logits(masks: np.ndarray) -> np.ndarray:
    """(K, 256, 256) float32 logits of (K, H, W) masks, as SAM's ``mask_input`` takes them."""
    return np.stack([cv2.resize(m.astype(np.float32), (256, 256)) * 20 - 10 for m in masks])


class VideoOracle:
    """ORACLE with SamPredictor's interface over a :class:`Scene`: ``set_image`` recognises the
    frame, and a prompt answers as :func:`prompt_answer` says: a box with the part inside it of the
    visible object it covers most, a point with the object under it (three masks with
    ``multimask_output``: :func:`multimask_answers`). ``mask_input`` is ignored."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self._index = {frame.tobytes(): t for t, frame in enumerate(scene.frames)}
        self.current = -1
        self.images = 0
        self.prompts = 0

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.current = self._index[np.ascontiguousarray(image).tobytes()]
        self.images += 1

    @property
    def embedding(self) -> int:
        """The frame set, as EnginePredictor's ``embedding``: kept and set back without a new
        ``set_image`` (no encoder pass)."""
        return self.current

    @embedding.setter
    def embedding(self, frame: int) -> None:
        self.current = frame

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.prompts += 1
        whole = prompt_answer(self.scene.objects[self.current], point_coords, point_labels, box)
        if multimask_output:
            masks, scores = multimask_answers(whole)
        else:
            masks, scores = whole[None], np.array([0.95], dtype=np.float32)
        return masks, scores, low_res_logits(masks)


def identity_switches(scene: Scene, tracks) -> tuple[int, float]:
    """(switches, coverage): how often the track matched to a true object (box IoU > 0.5) changes
    along its frames, and the share of (object, frame) pairs some track covers."""
    from usam_backend.systems.uvosam._common import _box_iou

    switches, covered, total = 0, 0, 0
    last: dict[int, int] = {}
    for t in range(len(scene.frames)):
        for k, box in scene.boxes(t).items():
            total += 1
            overlaps = [(_box_iou(box, tr.boxes[t]), tid) for tid, tr in tracks.items() if t in tr.boxes]
            best = max(overlaps, default=(0, 0))
            if best[0] > 0.5:
                covered += 1
                if k in last and last[k] != best[1]:
                    switches += 1
                last[k] = best[1]
    return switches, covered / total


class SegmenterOracle:
    """ORACLE with SemanticSegmenter's ``segment``: the true objects of a recognised frame as
    labelled regions (class from the scene, score 0.6-0.9), each missed with probability ``miss``."""

    class_names = ("round", "square")

    def __init__(self, scene: Scene, miss: float = 0.15, seed: int = 0):
        self.scene = scene
        self.miss = miss
        self.rng = np.random.default_rng(seed)
        self._index = {frame.tobytes(): t for t, frame in enumerate(scene.frames)}

    def segment(self, image: np.ndarray, *, classes=None):
        from usam_backend.core.regions import Regions

        ids = self.scene.objects[self._index[np.ascontiguousarray(image).tobytes()]]
        found = [k for k in np.unique(ids) if k and self.rng.random() >= self.miss]
        n = len(found)
        return Regions(
            masks=np.stack([ids == k for k in found]) if n else np.zeros((0, *ids.shape), bool),
            class_ids=np.array([self.scene.classes[int(k)] for k in found], dtype=np.int64),
            scores=self.rng.uniform(0.6, 0.9, size=n).astype(np.float32),
            points=np.zeros((n, 2), np.float32),
            sam_scores=np.ones(n, np.float32),
            class_names=self.class_names,
        )


def served(scene: Scene, stride: int, seed: int = 0, miss: float = 0.15):
    """Tracks as the backend finds them: the head (:class:`SegmenterOracle`) on every ``stride``-th
    frame and the last, tracks kept with ``min(3, sampled frames)`` sightings."""
    from usam_backend.systems.uvosam import TrackOptions, detect_tracks, sampled_frames

    chosen = sampled_frames(0, len(scene.frames), stride)
    return detect_tracks(
        [scene.frames[t] for t in chosen], SegmenterOracle(scene, miss=miss, seed=seed), frame_indices=chosen,
        min_hits=min(TrackOptions.min_hits, len(chosen)),
    )  # fmt: skip


def stride_scores(scene: Scene, stride: int, seeds: int = 8) -> tuple[float, int]:
    """(mean J&F, identity switches summed) of the served class-names path over ``seeds`` seeds of
    the head's misses, SAM (:class:`VideoOracle`) segmenting every frame."""
    from usam_backend.systems.uvosam import segment_video
    from usam_backend.tools.eval_video import evaluate_sequence

    scores, switches = [], 0
    for seed in range(seeds):
        tracks = served(scene, stride, seed)
        result = evaluate_sequence(
            np.stack(scene.objects), np.stack(segment_video(scene.frames, tracks, VideoOracle(scene)))
        )
        scores.append((result.j_mean + result.f_mean) / 2)
        switches += identity_switches(scene, tracks)[0]
    return float(np.mean(scores)), switches


def one_pass(scene: Scene, stride: int, seed: int = 0, miss: float = 0.15, predictor=None):
    """``usam video --head``'s path: :func:`~usam_backend.systems.uvosam.video_objects` over the
    scene, the head (:class:`SegmenterOracle`) on every ``stride``-th frame and the last, SAM
    (:class:`VideoOracle`, or ``predictor``) on every frame. Returns (id maps, tracks)."""
    from usam_backend.systems.uvosam import TrackOptions, head_detector, sampled_frames, video_objects

    tracks: dict = {}
    sampled = len(sampled_frames(0, len(scene.frames), stride))
    maps = list(
        video_objects(
            scene.frames, head_detector(SegmenterOracle(scene, miss=miss, seed=seed)),
            predictor if predictor is not None else VideoOracle(scene), stride=stride,
            min_hits=min(TrackOptions.min_hits, sampled), tracks=tracks,
        )
    )  # fmt: skip
    return maps, tracks


def one_pass_scores(scene: Scene, stride: int, seeds: int = 8) -> tuple[float, int]:
    """(mean J&F, identity switches summed) of :func:`one_pass` over ``seeds`` seeds of the head's misses."""
    from usam_backend.tools.eval_video import evaluate_sequence

    scores, switches = [], 0
    for seed in range(seeds):
        maps, tracks = one_pass(scene, stride, seed)
        result = evaluate_sequence(np.stack(scene.objects), np.stack(maps))
        scores.append((result.j_mean + result.f_mean) / 2)
        switches += identity_switches(scene, tracks)[0]
    return float(np.mean(scores)), switches


def stride_table(seeds: int = 8, strides: Sequence[int] = (1, 3, 5, 10)) -> str:
    """The README's stride tables: per scene of :data:`SCENES` and stride, J&F and identity
    switches, of ``usam video``'s one pass (:func:`one_pass`) and of tracks first, then masks from
    their boxes (:func:`stride_scores`: Label Studio's frame sequences)."""
    lines = []
    for title, scores in (("one pass (usam video)", one_pass_scores), ("tracks, then masks", stride_scores)):
        lines += [f"{title:<22}" + "".join(f"{'stride ' + str(s):>16}" for s in strides),
                  f"{'':<22}" + "".join(f"{'J&F  switches':>16}" for _ in strides)]  # fmt: skip
        for name, make in SCENES.items():
            scene = make()
            cells = [scores(scene, stride, seeds) for stride in strides]
            lines.append(f"{name:<22}" + "".join(f"{j:>10.3f}{s:>6}" for j, s in cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def report(seeds: int = 8) -> str:
    """The README's table: J&F and identity switches over ``seeds`` seeds of :func:`moving_shapes`
    (``python tests/video_scenes.py``)."""
    from usam_backend.systems.uvosam import (
        TrackOptions,
        detect_tracks,
        follow_object,
        sampled_frames,
        segment_video,
        track_boxes,
    )
    from usam_backend.tools.eval_video import evaluate_sequence

    scene = moving_shapes(30)

    def score(tracks) -> float:
        result = evaluate_sequence(
            np.stack(scene.objects), np.stack(segment_video(scene.frames, tracks, VideoOracle(scene)))
        )
        return (result.j_mean + result.f_mean) / 2

    rows = []
    clean = track_boxes(noisy_detections(scene, 0, jitter=0, miss=0, false_positives=0))
    rows.append(("the true boxes", score(clean), identity_switches(scene, clean)[0]))
    noisy = [track_boxes(noisy_detections(scene, seed)) for seed in range(seeds)]
    rows.append(("noisy detections", float(np.mean([score(t) for t in noisy])),
                 sum(identity_switches(scene, t)[0] for t in noisy)))  # fmt: skip
    for stride in (1, 3, 5):  # as served: the last frame sampled too, min_hits 3
        chosen = sampled_frames(0, 30, stride)
        min_hits = min(TrackOptions.min_hits, len(chosen))
        frames = [scene.frames[t] for t in chosen]
        found = [
            detect_tracks(frames, SegmenterOracle(scene, seed=seed), frame_indices=chosen, min_hits=min_hits)
            for seed in range(seeds)
        ]
        rows.append((f"class names, 1 frame in {stride}", float(np.mean([score(t) for t in found])),
                     sum(identity_switches(scene, t)[0] for t in found)))  # fmt: skip
    lines = [f"{'tracks from':<32}{'J&F':>7}{'switches':>10}"] + [f"{n:<32}{j:>7.3f}{s:>10}" for n, j, s in rows]
    for k, start in ((1, 5), (2, 25), (3, 2), (1, 20), (2, 5)):
        masks = follow_object(scene.frames, start, VideoOracle(scene), box=scene.boxes(start)[k])
        visible = [t for t in range(30) if (scene.objects[t] == k).any()]
        wrong = sum(bool((masks[t] & (scene.objects[t] != k)).any()) for t in masks)
        lines.append(f"follow object {k} from frame {start}: found on {sum(t in masks for t in visible)} of "
                     f"{len(visible)} frames it is visible on, {wrong} on another object")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(report())
    print()
    print(stride_table())
