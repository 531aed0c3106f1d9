"""UVOSAM: decoding, tracks from noisy detections, masks per track, following an object, and the
DAVIS-2017 J&F that scores them.

Random weights cannot show whether tracking and segmenting by track work, so quality is measured
with a deterministic geometric ORACLE (tests/video_scenes.py) over synthetic moving, crossing,
occluding shapes: a box gives the part inside it of the visible object it covers most, so a late,
shifted or shrunken box costs what it would cost with SAM. The tiny random SAM covers the plumbing
on real mp4 files."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from video_scenes import (
    Scene,
    SegmenterOracle,
    VideoOracle,
    box_pixels,
    identity_switches,
    moving_shapes,
    noisy_detections,
)

from usam_backend import EnginePredictor, follow_object, read_clip, segment_video, track_boxes
from usam_backend.core.settings import Settings
from usam_backend.core.video import VideoError, probe_video, write_video
from usam_backend.systems.uvosam import Track, TrackOptions, detect_tracks, paint, sampled_frames
from usam_backend.tools.eval_video import boundary_f, disk, evaluate_sequence, object_stats, region_j


def jf(scene, maps) -> float:
    r = evaluate_sequence(np.stack(scene.objects), np.stack(maps))
    return (r.j_mean + r.f_mean) / 2


def matched(scene, tracks) -> dict[int, int]:
    """true object -> the track overlapping it in most frames"""
    from usam_backend.systems.uvosam._common import _box_iou

    out = {}
    for k in scene.classes:
        votes: dict[int, int] = {}
        for t in range(len(scene.frames)):
            box = scene.boxes(t).get(k)
            for tid, tr in tracks.items():
                if box is not None and t in tr.boxes and _box_iou(box, tr.boxes[t]) > 0.5:
                    votes[tid] = votes.get(tid, 0) + 1
        out[k] = max(votes, key=votes.get)
    return out


# --- tracks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_noisy_detections_become_one_track_per_object_without_identity_switches(seed):
    scene = moving_shapes(30)
    tracks = track_boxes(noisy_detections(scene, seed))
    switches, coverage = identity_switches(scene, tracks)
    print(f"seed {seed}: {len(tracks)} tracks, {switches} identity switches, coverage {coverage:.3f}")
    assert len(tracks) == 3  # one-frame false positives start no track
    assert switches == 0  # the disc and the square cross
    assert coverage >= 0.9  # missed detections are interpolated
    assert sorted(tracks) == [1, 2, 3]
    owner = matched(scene, tracks)
    assert len(set(owner.values())) == 3
    for k, tid in owner.items():  # 10 % of class ids are flipped; the majority is right
        assert tracks[tid].class_id == scene.classes[k]
        assert 0.5 <= tracks[tid].score <= 0.95


def test_tracks_on_a_stride_cover_every_frame_between_sightings():
    scene = moving_shapes(31)
    frames = list(range(0, 31, 3))
    detections = [d for t, d in enumerate(noisy_detections(scene, 1, miss=0, false_positives=0)) if t in frames]
    tracks = track_boxes(detections, frames=frames, min_hits=2)
    assert len(tracks) == 3
    disc = tracks[matched(scene, tracks)[1]]
    assert set(disc.scores) <= set(frames)  # scores only where detected
    assert list(disc.boxes) == list(range(min(disc.boxes), max(disc.boxes) + 1))  # boxes on every frame
    maps = segment_video(scene.frames, tracks, VideoOracle(scene))
    assert jf(scene, maps) >= 0.85


def test_track_options_and_bad_detections():
    boxes = np.array([[10, 10, 30, 30], [11, 10, 31, 30], [60, 60, 80, 80]], dtype=float)
    frame = (boxes, np.array([0.9, 0.8, 0.05]), np.array([0, 0, 1]))
    tracks = track_boxes([frame] * 5)
    assert len(tracks) == 1  # the near-duplicate is suppressed (NMS 0.9), the 0.05 box ignored
    assert len(track_boxes([frame] * 2)) == 0  # fewer than min_hits sightings
    assert len(track_boxes([frame] * 2, min_hits=2)) == 1
    assert track_boxes([None, (np.zeros((0, 4)), np.zeros(0), np.zeros(0))]) == {}
    with pytest.raises(ValueError, match="3 boxes, 2 scores"):
        track_boxes([(boxes, np.array([0.9, 0.8]), np.array([0, 0, 1]))])
    with pytest.raises(ValueError, match="frame indices"):
        track_boxes([frame], frames=[0, 1])
    with pytest.raises(TypeError):
        track_boxes([frame], no_such_option=1)


# --- masks per track ---------------------------------------------------------------------------


def test_the_oracle_answers_a_box_with_the_part_of_the_object_inside_it():
    """The instrument first: a late or shrunken box must cost what it costs with SAM, and a box
    mostly over an object in front gives the object in front (what drop_duplicates is for)."""
    scene = moving_shapes(30)
    oracle = VideoOracle(scene)
    oracle.set_image(scene.frames[8])
    disc = scene.objects[8] == 1
    box = scene.boxes(8)[1]
    (whole,), _, _ = oracle.predict(box=box, multimask_output=False)
    assert np.array_equal(whole, disc)
    half = np.r_[(3 * box[:2] + box[2:]) / 4, (box[:2] + 3 * box[2:]) / 4]
    (part,), _, _ = oracle.predict(box=half, multimask_output=False)
    assert np.array_equal(part, disc & box_pixels(half, disc.shape)) and part.sum() < 0.4 * disc.sum()
    (late,), _, _ = oracle.predict(box=scene.boxes(7)[1], multimask_output=False)
    assert np.all(late <= disc) and 0.9 < late.sum() / disc.sum() < 0.98  # the disc moves 3 px a frame
    oracle.set_image(scene.frames[15])
    (front,), _, _ = oracle.predict(box=scene.boxes(15)[1], multimask_output=False)  # the disc, mostly hidden
    assert np.all(front <= (scene.objects[15] == 2))
    masks, scores, _ = oracle.predict(point_coords=np.array([[64.0, 46.0]]), point_labels=np.array([1]))
    assert len(masks) == 3 and np.array_equal(masks[int(np.argmax(scores))], scene.objects[15] == 2)
    (gone,), _, _ = oracle.predict(
        point_coords=np.array([[64.0, 46.0]]), point_labels=np.array([0]), box=scene.boxes(15)[2],
        multimask_output=False,
    )  # fmt: skip
    assert not (gone & (scene.objects[15] == 2)).any()  # a negative point removes the object under it


def test_segmenting_the_true_boxes_scores_what_the_boxes_allow():
    """With the true boxes, what is lost is frames 14-16: the disc, mostly behind the square, has a
    box holding more of the square than of the disc; SAM's answer there, the part of the square in
    that box (IoU 0.63 with the square), is no duplicate and takes the square's pixels. Boxes of the
    previous frame score 0.85, boxes at half their size 0.26."""
    scene = moving_shapes(30)
    tracks = track_boxes(noisy_detections(scene, 0, jitter=0, miss=0, false_positives=0))
    score = jf(scene, segment_video(scene.frames, tracks, VideoOracle(scene)))
    print(f"the true boxes: J&F {score:.3f}")
    assert score >= 0.95


@pytest.mark.parametrize("seed", range(3))
def test_segmenting_noisy_tracks_scores_high_j_and_f(seed):
    scene = moving_shapes(30)
    oracle = VideoOracle(scene)
    maps = segment_video(scene.frames, track_boxes(noisy_detections(scene, seed)), oracle)
    score = jf(scene, maps)
    print(f"seed {seed}: J&F {score:.3f} with the oracle, {oracle.prompts} box prompts on {oracle.images} frames")
    # 2 px of jitter on every corner clips the masks (0.87-0.91 over these seeds); boxes of the
    # previous frame reach 0.80-0.83
    assert score >= 0.85
    assert all(m.dtype == np.uint8 and m.shape == scene.objects[0].shape for m in maps)  # ids under 256


def test_the_box_of_an_object_behind_another_does_not_take_the_object_in_front():
    """On frame 15 the disc is mostly behind the square: its track's box (interpolated through the
    occlusion, the disc's whole extent) gives SAM the part of the square inside it. That mask is
    the square's own (IoU 0.88), so the square's track, whose box fits it, keeps it."""
    scene = moving_shapes(30)
    cx = int(20 + 85 * 15 / 29)  # the disc's centre (moving_shapes)
    tracks = {1: {15: np.array([cx - 14, 26, cx + 15, 55.0])}, 2: {15: scene.boxes(15)[2]}}
    ids = segment_video(scene.frames, tracks, VideoOracle(scene))[15]
    assert np.array_equal(ids == 2, scene.objects[15] == 2)
    assert not (ids == 1).any()  # the disc's visible sliver is given up with it


def test_a_track_keeps_its_id_on_frames_where_another_track_is_empty():
    """The public code numbers a frame's objects by counting non-empty masks: here track 2 would
    become object 1 on frame 1, where track 1 has no box."""
    scene = moving_shapes(3)
    truth = [scene.boxes(t) for t in range(3)]
    tracks = {1: {0: truth[0][1], 2: truth[2][1]}, 2: {t: truth[t][2] for t in range(3)}}
    maps = segment_video(scene.frames, tracks, VideoOracle(scene))
    assert set(np.unique(maps[1])) == {0, 2}
    assert np.array_equal(maps[1] == 2, scene.objects[1] == 2)
    assert set(np.unique(maps[0])) == {0, 1, 2}


def test_frames_without_boxes_are_not_shown_to_sam_and_get_no_mask():
    scene = moving_shapes(5)
    oracle = VideoOracle(scene)
    maps = segment_video(scene.frames, {3: {2: scene.boxes(2)[1]}}, oracle)
    assert oracle.images == 1
    assert [int(m.max()) for m in maps] == [0, 0, 3, 0, 0]


def test_overlaps_go_to_the_smaller_object():
    ids = np.zeros((10, 10), dtype=np.int32)
    big = np.zeros((10, 10), bool)
    big[2:9, 2:9] = True
    small = np.zeros((10, 10), bool)
    small[4:6, 4:6] = True
    paint(ids, [(int(small.sum()), 1, small), (int(big.sum()), 2, big)])
    assert ids[5, 5] == 1 and ids[3, 3] == 2


def test_bad_tracks_say_what_is_wrong():
    scene = moving_shapes(2)
    with pytest.raises(ValueError, match="start at 1"):
        segment_video(scene.frames, {0: {0: [0, 0, 5, 5]}}, VideoOracle(scene))
    with pytest.raises(ValueError, match="frame indices"):
        segment_video(scene.frames, {}, VideoOracle(scene), frame_indices=[0])
    maps = segment_video(scene.frames, {1: {0: [500, 500, 600, 600]}}, VideoOracle(scene))  # outside the frame
    assert not maps[0].any()


# --- following an annotator's object ---------------------------------------------------------


@pytest.mark.parametrize(("obj", "keyframe"), [(1, 5), (2, 25), (3, 2)])
def test_following_a_box_through_crossing_and_occlusion(obj, keyframe):
    scene = moving_shapes(30)
    masks = follow_object(scene.frames, keyframe, VideoOracle(scene), box=scene.boxes(keyframe)[obj])
    truth = {t: scene.objects[t] == obj for t in range(30)}
    visible = [t for t in range(30) if truth[t].sum() > 0.5 * max(m.sum() for m in truth.values())]
    assert not any((masks[t] & ~truth[t]).any() for t in masks)  # never another object
    # the object moves 3 px a frame: the frame after the keyframe, before its velocity is known,
    # is prompted with a box that cuts a column off
    assert min(region_j(truth[t], masks[t]) for t in masks) >= 0.95
    found = sum(t in masks for t in visible) / len(visible)
    print(f"object {obj} from frame {keyframe}: found on {found:.0%} of the frames it is mostly visible")
    assert found >= 0.9


def test_following_a_mask_and_bad_keyframes():
    scene = moving_shapes(10)
    start = scene.objects[4] == 2
    masks = follow_object(scene.frames, 4, VideoOracle(scene), mask=start, max_frames=2)
    assert sorted(masks) == [2, 3, 4, 5, 6]
    assert masks[4] is not None and np.array_equal(masks[4], start)
    with pytest.raises(ValueError, match="box or as a mask"):
        follow_object(scene.frames, 0, VideoOracle(scene))
    with pytest.raises(ValueError, match="outside the clip"):
        follow_object(scene.frames, 10, VideoOracle(scene), box=[0, 0, 5, 5])
    with pytest.raises(ValueError, match="non-empty"):
        follow_object(scene.frames, 0, VideoOracle(scene), mask=np.zeros((3, 3), bool))
    assert follow_object(scene.frames, 0, VideoOracle(scene), box=[0, 0, 4, 4]) == {}  # nothing there


# --- J&F, checked by hand ---------------------------------------------------------------------


def square(y0, x0, side, size=50):
    m = np.zeros((size, size), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_region_and_boundary_measures_by_hand():
    a, b = square(10, 10, 10), square(10, 15, 10)
    assert region_j(a, b) == pytest.approx(50 / 150)
    assert region_j(a, np.zeros_like(a)) == 0.0
    assert region_j(np.zeros_like(a), np.zeros_like(a)) == 1.0
    void = np.zeros_like(a)
    void[:, 15:] = True
    assert region_j(a, b, void) == 0.0  # only a's left half is left: b has none of it
    assert boundary_f(a, a) == 1.0
    assert boundary_f(a, np.zeros_like(a)) == 0.0
    assert boundary_f(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert boundary_f(a, square(30, 30, 10)) == 0.0  # far apart
    assert boundary_f(a, square(10, 11, 10)) == 1.0  # a 1-pixel shift is within the tolerance (1 px here)
    # one object of two equal far-apart parts, predicted as one part: precision 1, recall 1/2
    assert boundary_f(a | square(30, 30, 10), a) == pytest.approx(2 * 0.5 / 1.5)


def test_object_statistics_by_hand():
    stats = object_stats(np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=float))
    assert stats == {"mean": 0.5, "recall": 0.5, "decay": 1.0}
    # DAVIS's bins overlap: for 8 frames [0:3], [2:4], [3:6], [5:8]
    assert object_stats(np.array([1, 1, 0, 1, 1, 1, 0, 0.5]))["decay"] == pytest.approx(2 / 3 - 0.5)
    assert object_stats(np.array([1.0, 0.0]))["decay"] == 1.0
    assert (disk(1).sum(), disk(7).sum(), disk(8).sum()) == (5, 149, 197)  # skimage.morphology.disk's sizes


def test_an_unmatched_object_is_scored_against_an_empty_mask():
    gt = np.zeros((4, 50, 50), np.int32)
    gt[:2, 5:15, 5:15] = 1  # present on 2 of 4 frames
    result = evaluate_sequence(gt, np.zeros_like(gt))
    assert result.objects[0]["prediction"] is None and result.j_mean == 0.5 and result.f_mean == 0.5


def test_predicted_objects_are_matched_by_the_hungarian_algorithm():
    gt = np.zeros((4, 50, 50), np.int32)
    gt[:, 5:15, 5:15] = 1
    gt[:, 30:40, 30:40] = 2
    swapped = np.where(gt == 1, 7, np.where(gt == 2, 3, 0)).astype(np.int32)  # ids don't matter
    result = evaluate_sequence(gt, swapped)
    assert [(o["id"], o["prediction"]) for o in result.objects] == [(1, 7), (2, 3)]
    assert result.j_mean == result.f_mean == 1.0
    only_one = np.where(gt == 1, 1, 0).astype(np.int32)
    result = evaluate_sequence(gt, only_one)
    assert result.j_mean == 0.5 and result.objects[1]["prediction"] is None
    many = np.zeros_like(gt)
    for k in range(25):  # 25 one-pixel objects, and the true objects: 5 of the smallest are left out
        many[:, 45, k] = 100 + k
    many[gt > 0] = gt[gt > 0]
    result = evaluate_sequence(gt, many)
    assert result.dropped == 7 and result.j_mean == 1.0
    gt[:, 0, 0] = 255  # void
    assert evaluate_sequence(gt, swapped).j_mean == 1.0


# --- decoding and the tiny SAM ------------------------------------------------------------------


def test_video_files_and_frame_folders_decode_frame_accurately(tmp_path):
    scene = moving_shapes(12)
    path = write_video(tmp_path / "clip.mp4", scene.frames, 24)
    clip = read_clip(path)
    assert (len(clip), clip.fps, clip.frame_count, clip.duration) == (12, 24.0, 12, 0.5)
    assert np.abs(clip.frames[7].astype(int) - scene.frames[7]).mean() < 6  # lossy, but frame 7
    assert (
        np.abs(clip.frames[7].astype(int) - scene.frames[8]).mean()
        > np.abs(clip.frames[7].astype(int) - scene.frames[7]).mean()
    )
    strided = read_clip(path.read_bytes(), stride=5)
    assert strided.indices == [0, 5, 10] and strided.frame_count == 12
    middle = read_clip(path, start=5, stop=11, stride=2)  # sought, not decoded from the start
    assert middle.indices == [6, 8, 10] and middle.frame_count == 12
    assert np.abs(middle.frames[0].astype(int) - scene.frames[6]).mean() < 6
    assert probe_video(path) == (12, 24.0, 128, 96)
    webm = read_clip(write_video(tmp_path / "clip.webm", scene.frames, 25))
    assert (len(webm), webm.fps) == (12, 25.0)
    folder = tmp_path / "JPEGImages" / "shapes"
    folder.mkdir(parents=True)
    for t in (0, 1, 2, 10):  # numbered names sort by number
        Image.fromarray(scene.frames[t]).save(folder / f"{t}.png")
    frames = read_clip(folder, fps=30)
    assert frames.indices == [0, 1, 2, 3] and frames.fps == 30
    assert np.array_equal(frames.frames[3], scene.frames[10])


def test_bad_videos_get_clear_errors(tmp_path):
    with pytest.raises(VideoError, match="could not be decoded"):
        read_clip(b"\x00\x01not a video" * 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="holds no images"):
        read_clip(tmp_path / "empty")
    path = write_video(tmp_path / "clip.mp4", moving_shapes(6).frames, 24)
    with pytest.raises(VideoError, match="more than 3 frames"):
        read_clip(path, max_frames=3)
    with pytest.raises(VideoError, match="pixels a frame"):
        read_clip(path, max_pixels=1000)
    vfr = tmp_path / "vfr.mp4"
    with av.open(str(vfr), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        for pts in (0, 1, 2, 6, 7):  # frames 3-5 missing: timestamps jump
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), pts * 20, np.uint8), "rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 24)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoError, match="variable frame rate"):
        read_clip(vfr)


@pytest.mark.slow
def test_plumbing_on_an_mp4_with_the_tiny_sam(tiny_engine, tmp_path):
    scene = moving_shapes(6)
    clip = read_clip(write_video(tmp_path / "clip.mp4", scene.frames, 24))
    tracks = track_boxes(noisy_detections(scene, 0, miss=0, false_positives=0))
    maps = segment_video(clip.frames, tracks, EnginePredictor(tiny_engine))
    assert len(maps) == 6 and all(m.shape == clip.frames[0].shape[:2] for m in maps)
    assert set(np.unique(np.stack(maps))) <= {0, *tracks}
    masks = follow_object(clip.frames, 0, EnginePredictor(tiny_engine), box=scene.boxes(0)[1], max_frames=2)
    assert 0 in masks or masks == {}
    assert isinstance(next(iter(tracks.values())), Track)


def served_class_names_path(scene: Scene, stride: int, seed: int = 0) -> dict[int, Track]:
    """Tracks as the backend finds them on a clip (labelstudio.sequences, jobs.video): the head on
    the sampled frames (every ``stride``-th and the last), tracks kept with ``min_hits`` sightings
    (fewer when fewer frames are sampled)."""
    chosen = sampled_frames(0, len(scene.frames), stride)
    return detect_tracks(
        [scene.frames[t] for t in chosen], SegmenterOracle(scene, seed=seed), frame_indices=chosen,
        min_hits=min(TrackOptions.min_hits, len(chosen)),
    )  # fmt: skip


@pytest.mark.parametrize("stride", [1, 3])
def test_the_class_names_path_end_to_end_with_oracles(stride):
    """The head (a segmenter ORACLE missing 15 % of objects) on the sampled frames, tracks, SAM
    (the box ORACLE) on every frame: each object one labelled track, J&F high."""
    scene = moving_shapes(30)
    tracks = served_class_names_path(scene, stride)
    assert len(tracks) == 3
    owner = matched(scene, tracks)
    assert {k: tracks[tid].label for k, tid in owner.items()} == {1: "round", 2: "square", 3: "round"}
    score = jf(scene, segment_video(scene.frames, tracks, VideoOracle(scene)))
    print(f"stride {stride}: J&F {score:.3f}, switches {identity_switches(scene, tracks)[0]}")
    # on a stride a track starts and ends at sampled frames: frames before its first and after its
    # last sampling get no mask, and a missed sample at either end costs `stride` frames
    assert score >= 0.9
    assert identity_switches(scene, tracks)[0] == 0


def test_the_class_names_path_at_the_served_stride_and_min_hits():
    """USAM_VIDEO_STRIDE's default (5) and min_hits 3, over 8 seeds of the head's misses. The ellipse
    is on 5 of the 7 sampled frames: missed on 2 of them (15 % each), it has too few sightings and
    is lost (once in 8 seeds); a missed first or last sample costs a track 5 frames."""
    stride = Settings().video_stride
    assert (stride, TrackOptions.min_hits) == (5, 3)
    scene = moving_shapes(30)
    scores, found = [], 0
    for seed in range(8):
        tracks = served_class_names_path(scene, stride, seed)
        assert len(tracks) <= 3 and identity_switches(scene, tracks)[0] == 0
        found += len(tracks)
        scores.append(jf(scene, segment_video(scene.frames, tracks, VideoOracle(scene))))
    print(f"stride {stride}: J&F {np.round(scores, 3)}, mean {np.mean(scores):.3f}; {found} of 24 objects tracked")
    assert found >= 23
    assert np.mean(scores) >= 0.8 and min(scores) >= 0.6
