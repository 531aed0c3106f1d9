"""Synthetic videos for the UVOSAM tests: shapes that move, cross, occlude and leave the frame, with
their true per-frame object maps, and a geometric ORACLE with SamPredictor's interface over them.

The oracle is a measuring instrument for the algorithms around SAM (tracking, segmenting by track,
following an object), not a stand-in for the model: a box prompt answers with the visible part of the
true object the box covers most."""

from __future__ import annotations

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


class VideoOracle:
    """ORACLE with SamPredictor's interface over a :class:`Scene`: ``set_image`` recognises the
    frame, a box prompt answers with the visible part of the true object covering most of the box
    (an empty mask when the box holds no object)."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self._index = {frame.tobytes(): t for t, frame in enumerate(scene.frames)}
        self.current = -1
        self.images = 0
        self.prompts = 0

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.current = self._index[np.ascontiguousarray(image).tobytes()]
        self.images += 1

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        assert box is not None and not multimask_output
        self.prompts += 1
        ids = self.scene.objects[self.current]
        x0, y0, x1, y1 = (int(np.round(v)) for v in box)
        inside, counts = np.unique(ids[max(0, y0) : y1, max(0, x0) : x1], return_counts=True)
        counts[inside == 0] = 0
        mask = ids == int(inside[np.argmax(counts)]) if counts.size and counts.max() else np.zeros(ids.shape, bool)
        low_res = cv2.resize(mask.astype(np.float32), (256, 256))[None] * 20 - 10
        return mask[None], np.array([0.95], dtype=np.float32), low_res


def identity_switches(scene: Scene, tracks) -> tuple[int, float]:
    """(switches, coverage): how often the track matched to a true object (box IoU > 0.5) changes
    along its frames, and the share of (object, frame) pairs some track covers."""
    from usam_backend.systems.uvosam import _box_iou

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


def report(seeds: int = 8) -> str:
    """The README's table: J&F and identity switches over ``seeds`` seeds of :func:`moving_shapes`
    (``python tests/video_scenes.py``)."""
    from usam_backend.systems.uvosam import detect_tracks, follow_object, segment_video, track_boxes
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
    for stride in (1, 3, 5):
        chosen = list(range(0, 30, stride))
        found = [
            detect_tracks(
                [scene.frames[t] for t in chosen], SegmenterOracle(scene, seed=seed), frame_indices=chosen, min_hits=2
            )
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
