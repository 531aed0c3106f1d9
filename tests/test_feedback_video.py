"""Learning from video tracks: Label Studio's keyframes read on chosen frames only, predicted and
annotated tracks compared by track IoU, /health counting them, and a real mp4's annotated tracks
turned into labelled grid points on a bounded number of frames, each decoded and embedded once."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import usam_backend.jobs.training as training_job
from training.feedback import BACKGROUND, InstanceCache
from usam_backend.core.settings import Settings
from usam_backend.core.video import write_video
from usam_backend.jobs.training import TRACK_FRAMES, _track_instances, track_frames
from usam_backend.labelstudio.annotations import drawn_frames, expand_keyframes
from usam_backend.labelstudio.config import parse_label_config
from usam_backend.labelstudio.feedback import (
    Comparison,
    FeedbackStore,
    TaskFeedback,
    annotation_tracks,
    compare_tracks,
    spread_frames,
)
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.labelstudio.projects import EventLog

from conftest import scene
from helpers import WebHost

H, W, FRAMES = 160, 240, 24
CONFIG = """<View><Video name="video" value="$video"/><VideoRectangle name="box" toName="video"/>
<Labels name="tag" toName="video"><Label value="tomato"/><Label value="sky"/></Labels></View>"""


def key(frame: int, x: float, *, enabled: bool = True, width: float = 20.0) -> dict:
    return {"frame": frame, "enabled": enabled, "x": x, "y": 10.0, "width": width, "height": 30.0, "rotation": 0}


def track(rid: str, label: str, sequence: list[dict], frames: int = 100) -> dict:
    return {"id": rid, "type": "videorectangle", "from_name": "box", "to_name": "video",
            "value": {"labels": [label], "framesCount": frames, "sequence": sequence}}  # fmt: skip


def test_keyframes_on_chosen_frames_agree_with_the_whole_expansion():
    rng = np.random.default_rng(3)
    for _ in range(30):
        frames = sorted(rng.choice(np.arange(-2, 60), size=int(rng.integers(1, 7)), replace=True).tolist())
        sequence = [key(f, float(rng.uniform(0, 80)), enabled=bool(rng.random() < 0.7)) for f in frames]
        everything = expand_keyframes(sequence, 50)
        assert [f for r in drawn_frames(sequence, 50) for f in r] == list(everything)
        at = rng.choice(np.arange(0, 55), size=12).tolist()
        assert expand_keyframes(sequence, 50, at) == {f: v for f, v in everything.items() if f in at}
    assert spread_frames([range(1, 101)], 8) == [1, 15, 29, 43, 58, 72, 86, 100]
    assert spread_frames([range(1, 4), range(50, 52)], 8) == [1, 2, 3, 50, 51]


def test_tracks_are_kept_removed_changed_and_added_by_track_iou():
    predicted = annotation_tracks([
        track("same", "cat", [key(1, 10.0), key(50, 40.0, enabled=False)]),
        track("relabelled", "dog", [key(1, 60.0), key(30, 70.0, enabled=False)]),
        track("wrong", "cat", [key(60, 0.0), key(70, 0.0, enabled=False)]),
        track("shorter", "cat", [key(1, 80.0, width=15), key(90, 80.0, width=15, enabled=False)]),
    ])  # fmt: skip
    annotated = annotation_tracks([
        track("same", "cat", [key(1, 10.0), key(50, 40.0, enabled=False)]),
        track("a1", "cat", [key(1, 61.0), key(30, 71.0, enabled=False)]),  # drawn anew, a box 1 % to the right
        track("a2", "cat", [key(1, 80.0, width=15), key(30, 80.0, width=15, enabled=False)]),  # ends at 30, not 90
        track("new", "dog", [key(80, 5.0)]),
    ])  # fmt: skip
    result = compare_tracks(predicted, annotated, 0.5)
    assert result.kept == ["same"] and result.removed == ["wrong"] and result.added == ["new"]
    changed = {c["id"]: c for c in result.changed}
    assert changed["relabelled"]["label_from"] == "dog" and changed["relabelled"]["label_to"] == "cat"
    assert changed["relabelled"]["iou"] > 0.9
    assert changed["shorter"]["iou"] == 1.0 and changed["shorter"]["frames_iou"] == pytest.approx(30 / 90, abs=0.01)


def test_video_annotations_count_with_tracks_and_health_shows_them(tmp_path):
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    posted = annotation_tracks([track("p1", "cat", [key(1, 10.0), key(20, 10.0, enabled=False)]),
                                track("p2", "dog", [key(1, 60.0)])])  # fmt: skip
    store.record_prediction("7", 1, "usam-v1", [], tracks=posted)
    store.record_prediction("7", 2, "usam-v1", [], tracks=posted)
    kept = track("p1", "cat", [key(1, 10.0), key(20, 10.0, enabled=False)])
    events.append("7", {"action": "ANNOTATION_CREATED", "task": {"id": 1, "data": {"video": "a.mp4"}},
                        "annotation": {"id": 1, "result": [kept, track("n", "cat", [key(40, 30.0)])]}})  # fmt: skip
    events.append(
        "7",
        {
            "action": "ANNOTATION_CREATED",
            "task": {"id": 2, "data": {"video": "b.mp4"}},
            "annotation": {"id": 2, "result": []},
        },
    )  # every track rejected: no frame to learn from
    state = store.catch_up("7")
    assert (state.annotations, state.since_training, state.unlearnable) == (2, 1, 1)
    summary = store.summary("7")
    assert summary["by_shape"] == {"video/videorectangle": 2}
    assert summary["regions"] == {"kept": 1, "removed": 3, "changed": 0, "added": 1}
    (first, second) = store.tasks("7")
    assert [t.id for t in first.tracks] == ["p1", "n"] and first.tracks[1].frames() == [range(40, 101)]
    assert second.tracks == [] and second.comparison.removed == ["p1", "p2"]
    events.append("7", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]})
    store.catch_up("7")
    assert store.summary("7")["by_shape"] == {"video/videorectangle": 0}


@pytest.fixture(scope="module")
def clip_host(tmp_path_factory):
    """A 24-frame mp4: a tomato filling most of the frame drifts right (x = 4 + t, 190 px wide), and a
    small sky stays in the corner. (The tiny random SAM's masks cover most of a frame, so only an
    object that large can match a point's mask.)"""
    folder = tmp_path_factory.mktemp("track-video")
    frames = [
        scene((H, W), [("tomato", (4 + t, 8, 194 + t, 152)), ("sky", (216, 10, 236, 40))], seed=5)
        for t in range(FRAMES)
    ]
    write_video(folder / "clip.mp4", frames, 24)
    host = WebHost(folder)
    yield host
    host.stop()


def pct(x: float, y: float, w: float, h: float) -> dict:
    return {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * w / W, "height": 100 * h / H, "rotation": 0}


@pytest.mark.slow
def test_a_videos_tracks_teach_on_a_bounded_number_of_frames(tiny_engine, clip_host, tmp_path, monkeypatch):
    result = [
        track("t", "tomato", [{"frame": 1, "enabled": True, **pct(4, 8, 190, 144)},
                              {"frame": 24, "enabled": False, **pct(27, 8, 190, 144)}], FRAMES),
        track("s", "sky", [{"frame": 1, "enabled": True, **pct(216, 10, 20, 30)}], FRAMES),
    ]  # fmt: skip
    tracks = annotation_tracks(result)
    frames = track_frames(tracks)
    assert len(frames) == TRACK_FRAMES and frames[0] == 1 and frames[-1] == FRAMES
    task = TaskFeedback(1, 1, {"video": f"{clip_host.url}/clip.mp4"}, [], Comparison(), None, tracks=tracks)
    settings = Settings(sam_type="tiny", device="cpu", points=64, cache_dir=tmp_path, allowed_hosts=("127.0.0.1",))
    cache = InstanceCache(tmp_path / "instances", tiny_engine.sam.fingerprint, 64, settings.feedback_iou)
    decoded: list[int] = []
    read_clip = training_job.read_clip

    def counting(source, **kwargs):
        clip = read_clip(source, **kwargs)
        decoded.extend(clip.indices)
        return clip

    monkeypatch.setattr(training_job, "read_clip", counting)
    labels = {"tomato": 0, "sky": 1}
    with httpx.Client() as client:
        fetcher = fetcher_for(settings, None, client, video=True)
        config = parse_label_config(CONFIG)
        parts = _track_instances(settings, task, config, fetcher, cache, tiny_engine, labels)
        assert decoded == [f - 1 for f in frames]  # each frame decoded alone, once
        assert len(parts) == TRACK_FRAMES
        y = np.concatenate([p.y for p in parts])
        assert set(np.unique(y)) <= {BACKGROUND, 0, 1}
        tomato_points = [int((p.y == 0).sum()) for p in parts]
        assert all(n > 0 for n in tomato_points), tomato_points  # on every frame the moving box is met
        again = _track_instances(settings, task, config, fetcher, cache, tiny_engine, labels)
    assert decoded == [f - 1 for f in frames]  # the second time, every frame's instances came from the cache
    assert all((a.y == b.y).all() for a, b in zip(parts, again, strict=True))
