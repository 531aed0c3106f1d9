"""Learning from annotators: the feedback store, instance supervision, calibration and task scores."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import train_head
from training.calibration import calibrate
from training.feedback import BACKGROUND, IGNORE, _label, point_labels
from training.head import Head, HeadConfig, HeadNet
from training.metrics import instance_map
from training.study import FEEDBACK_WORLD, run_feedback_study
from training.synthetic import make_world, source_bags, target_bags
from usam_backend.core.errors import DataError
from usam_backend.core.masks import mask_to_rle
from usam_backend.core.regions import Region, decision_confidence
from usam_backend.labelstudio.feedback import FeedbackStore, annotation_regions, compare
from usam_backend.labelstudio.projects import EventLog


def box_mask(box, shape=(40, 60)):
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def region(rid, label, box, shape=(40, 60)):
    return Region(rid, label, "tag", "image", mask_to_rle(box_mask(box, shape)))


def ls_brush(label, box, shape=(40, 60), rid=None):
    from label_studio_sdk.converter.brush import mask2rle

    rle = mask2rle(box_mask(box, shape).astype(np.uint8) * 255)
    item = {
        "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_height": shape[0],
        "original_width": shape[1], "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }  # fmt: skip
    if rid:
        item["id"] = rid
    return item


def test_compare_tells_kept_removed_changed_and_added():
    predicted = [
        region("a", "cat", (0, 0, 20, 20)),
        region("b", "dog", (30, 0, 50, 20)),
        region("c", "cat", (0, 25, 10, 35)),
    ]
    annotated = [
        region("a", "cat", (0, 0, 20, 20)),  # accepted as is (same id)
        region("x", "cat", (31, 0, 50, 20)),  # b relabelled and nudged: matched by IoU
        region("y", "dog", (40, 25, 60, 40)),  # drawn by the annotator
    ]
    result = compare(predicted, annotated, match_iou=0.5)
    assert result.kept == ["a"]
    assert [(c["id"], c["label_from"], c["label_to"]) for c in result.changed] == [("b", "dog", "cat")]
    assert result.removed == ["c"] and result.added == ["y"]


def test_feedback_store_follows_the_event_log_and_survives_a_restart(tmp_path):
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    store.record_prediction(
        "7", 1, "usam-tiny-v1", [region("p1", "cat", (0, 0, 20, 20)), region("p2", "dog", (30, 0, 50, 20))]
    )
    task = {"id": 1, "data": {"image": "/data/upload/7/a.png"}}
    events.append(
        "7",
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": 11, "result": [ls_brush("cat", (0, 0, 20, 20), rid="p1")]},
            "task": task,
        },
    )
    events.append("7", {"action": "PROJECT_UPDATED"})
    state = store.catch_up("7")
    log_file = tmp_path / "events" / "7.jsonl"
    assert state.byte_offset == log_file.stat().st_size
    assert (state.since_training, state.annotations, state.tasks) == (1, 1, 1)
    assert store.summary("7")["regions"] == {"kept": 1, "removed": 1, "changed": 0, "added": 0}
    (feedback,) = store.tasks("7")
    assert feedback.comparison.kept == ["p1"] and feedback.comparison.removed == ["p2"]
    assert feedback.data == task["data"] and feedback.model_version == "usam-tiny-v1"

    # a restarted backend reads only what is new; an update replaces the task's record
    events.append(
        "7",
        {
            "action": "ANNOTATION_UPDATED",
            "annotation": {"id": 11, "task": 1, "result": [ls_brush("dog", (0, 0, 20, 20), rid="p1")]},
        },
    )
    with log_file.open("a") as out:
        out.write('{"action":"ANNOTATION_CREATED","annot')  # a line still being written
    restarted = FeedbackStore(tmp_path / "feedback", EventLog(tmp_path / "events"))
    state = restarted.catch_up("7")
    assert state.byte_offset < log_file.stat().st_size  # the unfinished line waits
    assert (state.since_training, state.annotations, state.tasks) == (2, 2, 1)
    assert restarted.summary("7")["regions"] == {"kept": 0, "removed": 1, "changed": 1, "added": 0}
    with log_file.open("a") as out:
        out.write('ation":{"id":12,"result":[]},"task":{"id":2,"data":{"image":"b.png"}}}\n')
    assert restarted.catch_up("7").tasks == 2 and restarted.catch_up("7").annotations == 3
    feedback = restarted.tasks("7")[0]
    assert feedback.comparison.changed[0]["label_to"] == "dog" and feedback.data == task["data"]
    restarted.training_queued("7")
    assert restarted.state("7").since_training == 0

    events.append("7", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}]})
    restarted.catch_up("7")
    assert [t.task for t in restarted.tasks("7")] == [2]
    assert restarted.summary("7")["annotated_tasks"] == 1
    assert restarted.summary("7")["regions"] == {"kept": 0, "removed": 0, "changed": 0, "added": 0}


def test_annotation_regions_keep_brushes_and_skip_the_rest():
    result = [
        ls_brush("cat", (0, 0, 10, 10)),
        {"type": "keypointlabels", "value": {"x": 1}},
        {"type": "brushlabels", "value": {"rle": "bad"}},
    ]
    (only,) = annotation_regions(result)
    assert only.label == "cat" and only.mask().sum() == 100


def test_point_label_rule():
    regions = [region("r", "cat", (0, 0, 20, 20))]
    masks = [r.mask() for r in regions]
    areas = np.array([m.sum() for m in masks])
    index = {"cat": 0}
    assert _label(box_mask((0, 0, 20, 18)), 5, 5, masks, areas, regions, index, 0.5) == 0  # matches the region
    assert _label(box_mask((0, 0, 6, 6)), 3, 3, masks, areas, regions, index, 0.5) == IGNORE  # a part of it
    assert _label(box_mask((30, 20, 60, 40)), 30, 45, masks, areas, regions, index, 0.5) == BACKGROUND
    assert _label(box_mask((0, 0, 20, 18)), 5, 5, masks, areas, regions, {"dog": 0}, 0.5) == IGNORE  # unknown label


def test_point_labels_on_a_real_tiny_sam(tiny_engine, two_object_image):
    regions = [region("r", "tomato", (20, 30, 100, 130), shape=(160, 240))]
    x, y = point_labels(tiny_engine, two_object_image, regions, {"tomato": 0}, points=64, match_iou=0.5)
    assert x.shape == (64, tiny_engine.embedding_dim) and y.shape == (64,)
    assert set(np.unique(y)) <= {IGNORE, BACKGROUND, 0}
    grid = tiny_engine.grid_points((160, 240), 64)
    outside = ~((grid[:, 0] >= 20) & (grid[:, 0] < 100) & (grid[:, 1] >= 30) & (grid[:, 1] < 130))
    assert (y[outside] != IGNORE).all()  # only points on an annotated region can be ambiguous


def test_instances_need_the_right_shapes_and_a_background_output():
    bags = np.random.default_rng(0).normal(size=(8, 5, 4)).astype(np.float32)
    targets = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    fast = {"epochs": 2, "hidden": (8, 8, 8)}
    with pytest.raises(DataError, match=r"shape \(M, 4\)"):
        train_head(bags, targets, ["a", "b"], instances=np.zeros((3, 5)), instance_targets=np.zeros(3, int), **fast)
    with pytest.raises(DataError, match=r"-1 \(background\) \.\. 1"):
        train_head(bags, targets, ["a", "b"], instances=np.zeros((3, 4)), instance_targets=np.array([0, 2, 1]), **fast)
    with pytest.raises(DataError, match="need the background output"):
        train_head(
            bags,
            targets,
            ["a", "b"],
            instances=np.zeros((1, 4)),
            instance_targets=np.array([-1]),
            background=False,
            **fast,
        )
    head = train_head(bags, targets, ["a", "b"], instances=np.zeros((2, 4)), instance_targets=np.array([-1, 0]), **fast)
    assert head.config.background and head.info["training"]["instances"] == {"a": 1, "_background": 1}


def test_feedback_from_a_few_annotated_images_raises_instance_map():
    common = {"per_class": 25, "epochs": 25, "annotated": 5}
    before, chance = run_feedback_study(range(3), feedback=False, **common)
    after, _ = run_feedback_study(range(3), **common)
    print(
        f"\nheld-out target images, world {FEEDBACK_WORLD}, 3 seeds: mAP {np.mean(before.map):.3f} ± "
        f"{np.std(before.map):.3f} -> {np.mean(after.map):.3f} ± {np.std(after.map):.3f} with 5 annotated images; "
        f"background false positives {np.mean(before.background_fp):.3f} -> {np.mean(after.background_fp):.3f}; "
        f"chance {chance:.3f}"
    )
    assert np.mean(after.map) > np.mean(before.map) + 0.05
    assert np.mean(after.background_fp) < np.mean(before.background_fp) / 2


@pytest.fixture(scope="module")
def feedback_head():
    world = make_world(classes=4, seed=1, **FEEDBACK_WORLD)
    train = source_bags(world, per_class=25, seed=2)
    labelled = target_bags(world, images=6, seed=4)
    head = train_head(
        train.bags, train.targets, [f"c{i}" for i in range(4)], epochs=25,
        instances=labelled.bags.reshape(-1, labelled.bags.shape[-1]), instance_targets=labelled.labels.reshape(-1),
    )  # fmt: skip
    calibration_set = target_bags(world, images=6, seed=5)
    return head, world, calibration_set


def test_calibration_lowers_the_likelihood_loss(feedback_head):
    head, _, points = feedback_head
    x, y = points.bags.reshape(-1, points.bags.shape[-1]), points.labels.reshape(-1)
    record = calibrate(head, x, y)
    assert record is not None and record["nll"] <= record["nll_uncalibrated"]
    assert head.temperature == record["temperature"]


@pytest.mark.parametrize(("scale", "gain"), [(4.0, 0.4), (0.5, 0.05)])  # measured gains: 0.60, 0.073
def test_calibration_finds_the_temperature_that_undoes_over_or_under_confidence(scale, gain):
    """Labels drawn from softmax(W x); the head's logits are ``scale`` W x, so the right temperature
    is ``scale`` and, divided by it, the head's probabilities are the true ones. ``gain``: how much
    lower the negative log-likelihood must get."""
    rng = np.random.default_rng(0)
    n, dim, classes = 4000, 6, 3
    x = rng.normal(size=(n, dim)).astype(np.float32)
    weights = rng.normal(size=(classes, dim)).astype(np.float32)
    logits = torch.as_tensor(x @ weights.T)
    truth = logits.softmax(dim=1).numpy()
    y = np.array([rng.choice(classes, p=row / row.sum()) for row in truth])
    config = HeadConfig(input_dim=dim, num_classes=classes, hidden=())  # one linear layer
    net = HeadNet(config)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.as_tensor(scale * weights))
        net.layers[0].bias.zero_()
    head = Head(net, config, ("a", "b", "c"))

    record = calibrate(head, x, y)
    assert record is not None and head.temperature == record["temperature"]
    assert record["temperature"] == pytest.approx(scale, rel=0.1)
    assert record["nll"] <= record["nll_uncalibrated"] - gain
    assert record["nll"] == pytest.approx(float(F.cross_entropy(logits, torch.as_tensor(y))), abs=0.005)
    assert np.abs(head.predict_proba(x) - truth).max() < 0.01


def test_lower_task_scores_go_with_more_errors(feedback_head):
    """Scores of a head calibrated on whole images held out from its training, measured on others."""
    head, world, held_out = feedback_head
    calibrate(head, held_out.bags.reshape(-1, held_out.bags.shape[-1]), held_out.labels.reshape(-1))
    test = target_bags(world, images=120, seed=9)
    scores, errors = [], []
    for bag, labels in zip(test.bags, test.labels, strict=True):
        probs = head.predict_proba(bag)
        best, cls = probs.max(axis=1), probs.argmax(axis=1)
        claimed = best >= 0.5
        wrong = np.where(claimed, cls != labels, labels >= 0)  # a claimed point of the wrong class, or a missed object
        scores.append(decision_confidence(best, 0.5))
        errors.append(wrong.mean())
    scores, errors = np.array(scores), np.array(errors)
    order = np.argsort(scores)
    quarter = len(scores) // 4
    low, high = errors[order[:quarter]].mean(), errors[order[-quarter:]].mean()
    rho = np.corrcoef(np.argsort(np.argsort(scores)), np.argsort(np.argsort(errors)))[0, 1]
    print(f"\nerror rate: least confident quarter {low:.3f}, most confident quarter {high:.3f}; Spearman {rho:.2f}")
    assert low > 1.5 * high
    assert rho < -0.3
    assert instance_map(head.predict_proba(test.bags.reshape(-1, test.bags.shape[-1])), test.labels.reshape(-1)) > 0.5


def test_an_event_that_fails_is_retried_never_skipped(tmp_path, monkeypatch):
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    for task in (1, 2, 3):
        annotation = {"id": 10 + task, "result": [ls_brush("cat", (0, 0, 20, 20))]}
        events.append("7", {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": {"id": task}})
    original = FeedbackStore._record_annotation
    calls = []

    def flaky(self, pid, task_id, *args):
        calls.append(task_id)
        if task_id == 2 and calls.count(2) == 1:
            raise OSError("disk full")
        return original(self, pid, task_id, *args)

    monkeypatch.setattr(FeedbackStore, "_record_annotation", flaky)
    state = store.catch_up("7")
    assert state.tasks == 1 and "OSError: disk full" in (state.error or "")
    assert "disk full" in store.summary("7")["error"]
    state = store.catch_up("7")  # the next catch-up starts at the failed event
    assert state.tasks == 3 and state.annotations == 3 and state.error is None
    assert calls == [1, 2, 2, 3] and "error" not in store.summary("7")


def test_a_folded_in_log_is_rotated(tmp_path, monkeypatch):
    monkeypatch.setattr(EventLog, "ROTATE_BYTES", 2000)
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    for task in range(1, 9):
        annotation = {"id": 100 + task, "result": [ls_brush("cat", (0, 0, 20, 20))]}
        events.append("7", {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": {"id": task}})
    assert events.size("7") > 2000
    state = store.catch_up("7")
    assert state.byte_offset == 0 and events.size("7") == 0 and state.tasks == 8
    assert (tmp_path / "events" / "7.jsonl.1").stat().st_size > 2000  # one generation of history
    events.append("7", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 103}]})
    assert store.catch_up("7").tasks == 7  # the per-annotation index survives the rotation


def test_replaying_events_after_a_crash_counts_each_task_once(tmp_path):
    events = EventLog(tmp_path / "events")
    store = FeedbackStore(tmp_path / "feedback", events)
    for task in (1, 2):
        annotation = {"id": 20 + task, "result": [ls_brush("cat", (0, 0, 20, 20))]}
        events.append("7", {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": {"id": task}})
    first = store.catch_up("7")
    assert first.tasks == 2
    # a crash after the task records were written, before the state was: the state is one event behind
    (_, end_of_first), _ = events.read_from("7", 0)
    stale = {**json.loads((tmp_path / "feedback" / "7" / "state.json").read_text())}
    stale.update(byte_offset=end_of_first, tasks=1, annotations=1, since_training=1)
    stale["regions"] = {"kept": 0, "removed": 0, "changed": 0, "added": 1}
    (tmp_path / "feedback" / "7" / "state.json").write_text(json.dumps(stale))
    replayed = store.catch_up("7")
    assert (replayed.tasks, replayed.annotations, replayed.regions["added"]) == (2, 2, 2)


P = [0.1, 0.35, 0.55, 0.9]  # mean 0.475: 1 - mean(p) is 0.525 at every threshold


@pytest.mark.parametrize(
    ("best_probs", "threshold", "score"),
    [
        (P, 0.3, (0.9 + 0.35 + 0.55 + 0.9) / 4),  # 0.675: only 0.1 is left as background
        (P, 0.5, (0.9 + 0.65 + 0.55 + 0.9) / 4),  # 0.75
        (P, 0.7, (0.9 + 0.65 + 0.45 + 0.9) / 4),  # 0.725: 0.55 is background now, right with 0.45
        ([0.3, 0.7], 0.3, (0.3 + 0.7) / 2),  # p equal to the threshold is claimed: right with p
        ([0.3, 0.7], 0.7, (0.7 + 0.7) / 2),
        ([], 0.3, float("nan")),
    ],
)
def test_task_score_is_the_expected_share_of_right_decisions_at_the_threshold(best_probs, threshold, score):
    """README *Scores*: mean over the grid of (p if p >= threshold else 1 - p)."""
    found = decision_confidence(np.array(best_probs), threshold)
    assert found == pytest.approx(score, abs=1e-12, nan_ok=True)
