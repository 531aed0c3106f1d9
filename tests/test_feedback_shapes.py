"""Learning from every annotation shape: polygons, rectangles, ellipses and brush regions on images
and on frame sequences become labelled masks; only annotations holding something to learn queue
retraining; /health counts regions per task type and shape."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from usam_backend.core.errors import DataError
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Region
from usam_backend.jobs.training import _annotated_images
from usam_backend.labelstudio.feedback import FeedbackStore, TaskFeedback, annotation_regions, compare
from usam_backend.labelstudio.projects import EventLog

H, W = 40, 60


def shaped(kind: str, label: str, rid: str, **extra) -> dict:
    values = {
        "polygonlabels": {"points": [[10, 10], [50, 10], [50, 60], [10, 60]], "closed": True},
        "rectanglelabels": {"x": 10, "y": 25, "width": 40, "height": 50, "rotation": 0},
        "ellipselabels": {"x": 50, "y": 50, "radiusX": 20, "radiusY": 30, "rotation": 0},
    }
    return {"id": rid, "type": kind, "from_name": "tag", "to_name": "image", "original_width": W,
            "original_height": H, "value": {**values[kind], kind: [label]}, **extra}  # fmt: skip


def brush(label: str, rid: str, **extra) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[4:24, 6:30] = 255
    value = {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]}
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": W,
            "original_height": H, "value": value, **extra}  # fmt: skip


def test_every_image_shape_becomes_a_labelled_mask():
    track = {"id": "v", "type": "videorectangle", "from_name": "box", "to_name": "video",
             "value": {"labels": ["cat"], "framesCount": 10, "sequence": []}}  # fmt: skip
    huge = {**shaped("polygonlabels", "cat", "h"), "original_width": 100_000, "original_height": 100_000}
    result = [shaped("polygonlabels", "cat", "p"), shaped("rectanglelabels", "dog", "r"),
              shaped("ellipselabels", "cat", "e"), brush("dog", "b"), track, huge,
              {"type": "choices", "value": {"choices": ["x"]}}]  # fmt: skip
    regions = {r.id: r for r in annotation_regions(result, task=1, max_pixels=10_000_000)}
    assert set(regions) == {"p", "r", "e", "b"}  # not the video track, the oversized region or the choice
    assert {r.shape for r in regions.values()} == {"polygon", "rectangle", "ellipse", "brush"}
    box = regions["r"].mask()
    assert box.shape == (H, W) and box[10:30, 6:30].all() and box.sum() == 20 * 24  # x 10-50 %, y 25-75 %
    assert regions["p"].mask()[4:24, 6:30].all() and regions["b"].mask().sum() == 20 * 24
    assert all(r.frame is None for r in regions.values())
    on_frames = annotation_regions([brush("dog", "f3", item_index=3), shaped("polygonlabels", "cat", "f0")])
    assert [(r.id, r.frame) for r in on_frames] == [("f3", 3), ("f0", None)]


def test_regions_match_only_on_their_own_frame():
    mask = np.zeros((H, W), bool)
    mask[5:20, 5:20] = True
    predicted = [Region("a", "cat", "tag", "frames", mask_to_rle(mask), frame=1)]
    same_frame = [Region("x", "cat", "tag", "frames", mask_to_rle(mask), frame=1, shape="polygon")]
    other_frame = [Region("x", "cat", "tag", "frames", mask_to_rle(mask), frame=2, shape="polygon")]
    assert compare(predicted, same_frame, 0.5).kept == ["a"]
    unmatched = compare(predicted, other_frame, 0.5)
    assert unmatched.removed == ["a"] and unmatched.added == ["x"]


def test_only_learnable_annotations_queue_training_and_health_counts_shapes(tmp_path):
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    track = {"id": "v", "type": "videorectangle", "from_name": "box", "to_name": "video",
             "value": {"labels": ["cat"], "framesCount": 10, "sequence": []}}  # fmt: skip
    events.append("5", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": [track]},
                        "task": {"id": 1, "data": {"video": "v.mp4"}}})  # fmt: skip
    state = store.catch_up("5")
    assert (state.annotations, state.since_training, state.unlearnable) == (1, 0, 1)
    events.append("5", {"action": "ANNOTATION_CREATED", "task": {"id": 2, "data": {"image": "a.png"}},
                        "annotation": {"id": 2, "result": [shaped("polygonlabels", "cat", "p"),
                                                           shaped("rectanglelabels", "dog", "r")]}})  # fmt: skip
    events.append("5", {"action": "ANNOTATION_CREATED", "task": {"id": 3, "data": {"frames": ["0.png", "1.png"]}},
                        "annotation": {"id": 3, "result": [brush("dog", "b", item_index=1)]}})  # fmt: skip
    state = store.catch_up("5")
    assert (state.annotations, state.since_training, state.unlearnable) == (3, 2, 1)
    summary = store.summary("5")
    assert summary["by_shape"] == {"image/polygon": 1, "image/rectangle": 1, "sequence/brush": 1}
    assert summary["not_learnable"] == 1 and summary["regions"]["added"] == 3
    events.append("5", {"action": "ANNOTATION_UPDATED", "task": {"id": 2, "data": {"image": "a.png"}},
                        "annotation": {"id": 2, "result": [shaped("ellipselabels", "cat", "e")]}})  # fmt: skip
    assert store.catch_up("5") and store.summary("5")["by_shape"] == {
        "image/polygon": 0,
        "image/rectangle": 0,
        "image/ellipse": 1,
        "sequence/brush": 1,
    }  # the task's earlier regions are taken out of the counts


def test_a_sequence_teaches_on_each_annotated_frame():
    mask = np.zeros((H, W), bool)
    mask[5:20, 5:20] = True
    regions = [Region("a", "cat", "tag", "frames", mask_to_rle(mask), frame=2),
               Region("b", "dog", "tag", "frames", mask_to_rle(mask), frame=0, shape="polygon"),
               Region("c", "dog", "tag", "other", mask_to_rle(mask))]  # fmt: skip
    task = TaskFeedback(7, 1, {"frames": ["f0.png", "f1.png", "f2.png"], "image": "i.png"}, regions,
                        compare([], regions, 0.5), None)  # fmt: skip
    found = _annotated_images(task, "frames", True, "frames", max_frames=10)
    assert [(ref, [r.id for r in rs]) for ref, rs in found] == [("f0.png", ["b"]), ("f2.png", ["a"])]
    assert _annotated_images(task, "other", False, "image", max_frames=10) == [("i.png", [regions[2]])]
    assert len(_annotated_images(task, "frames", True, "frames", max_frames=1)) == 1
    with pytest.raises(DataError, match="frame 2 of a 2-frame"):
        _annotated_images(TaskFeedback(7, 1, {"frames": ["f0.png", "f1.png"]}, regions, compare([], [], 0.5), None),
                          "frames", True, "frames", max_frames=10)  # fmt: skip


def test_a_video_job_keeps_the_head_it_started_under(trained_head, tmp_path):
    """Retraining publishes a new head while a video's chunks are in flight: the jobs of that video
    finish with the head of the version they were submitted under while its file is on disk, and
    only when it is gone do they take the serving head (and the chunk set restarts under it)."""
    import copy
    import time

    import torch

    from usam_backend.core.settings import Settings
    from usam_backend.jobs.preannotate import serving
    from usam_backend.labelstudio.projects import ProjectRecord, ProjectStore

    xml = """<View><Video name="video" value="$video"/><VideoRectangle name="box" toName="video"/>
<Labels name="labels" toName="video"><Label value="tomato"/><Label value="sky"/></Labels></View>"""
    settings = Settings(model_dir=tmp_path, cache_dir=tmp_path / "cache", sam_type="tiny", device="cpu")
    ProjectStore(tmp_path / "projects").put(ProjectRecord("4", xml))
    trained_head.save(tmp_path / "heads" / "old.pt")
    old = serving(settings, "4")[2].version
    newer = copy.deepcopy(trained_head)
    with torch.no_grad():
        next(newer.net.parameters()).add_(0.01)  # retrained: other weights, another version
    time.sleep(0.01)
    newer.save(tmp_path / "heads" / "new.pt")
    current = serving(settings, "4")[2].version
    assert current != old
    assert serving(settings, "4", old)[2].version == old  # the jobs started under the old head keep it
    (tmp_path / "heads" / "old.pt").unlink()
    assert serving(settings, "4", old)[2].version == current  # gone: the serving head (the set restarts)
