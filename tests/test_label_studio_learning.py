"""End to end against a real Label Studio 1.23.2: annotations of every kind teach the head.

One usam server and one RQ worker (Redis) serve three projects whose shared head was trained on poor
class images: half of each class's pictures are the other class's. In each project the ground truth
of two tasks (a tomato's, a sky's) is submitted as annotations (video tracks, frame-sequence polygons,
image polygons); Label Studio's webhooks bring them to usam, which queues a retrain after two
(``USAM_RETRAIN_EVERY=2``) and the worker trains the project's own head; the two held-out tasks (a
tomato's, a sky's) are predicted again and compared with their truth, before and after. The numbers
are printed.

The tiny random SAM's masks cover about 80 % of a frame whatever the prompt, so its masks only match
objects that fill most of a frame: every scene here is one such object (a red tomato or a blue sky,
which even random-weight features tell apart by colour). What improves is the head's decisions; the
masks stay the random SAM's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.pipeline import train_from_folders
from usam_backend.core.masks import box_ious
from usam_backend.core.shapes import polygons_mask
from usam_backend.core.video import write_video
from usam_backend.labelstudio.annotations import read_results

from conftest import scene
from helpers import ROOT, UsamServer, WebHost, project_config, run_worker, wait_until

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

LABELS = {"tomato": None, "sky": None}
H, W, FRAMES, SEQUENCE = 160, 240, 10, 4
KINDS = {"tomato": 11, "sky": 12, "held-tomato": 13, "held-sky": 14}
"""Each task's one object (its label is the name's last word) and the seed of its noise."""
ANNOTATED, HELD_OUT = ("tomato", "sky"), ("held-tomato", "held-sky")


def dominant(t: int) -> tuple[int, int, int, int]:
    """The object's box on frame ``t`` (0-based): most of the frame, drifting right."""
    return 4 + t, 8, 194 + t, 152


def label_of(kind: str) -> str:
    return kind.split("-")[-1]


def frames_of(kind: str, frames: int, seed: int) -> list[np.ndarray]:
    return [scene((H, W), [(label_of(kind), dominant(t))], seed=seed) for t in range(frames)]


def pct_box(t: int) -> dict[str, float]:
    x0, y0, x1, y1 = dominant(t)
    return {"x": 100 * x0 / W, "y": 100 * y0 / H, "width": 100 * (x1 - x0) / W, "height": 100 * (y1 - y0) / H}


def pct_polygon(t: int) -> list[list[float]]:
    x0, y0, x1, y1 = dominant(t)
    return [[100 * x / W, 100 * y / H] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]


def truth_track(kind: str) -> list[dict]:
    """The ground-truth videorectangle track, as an annotator draws it: a keyframe at each end."""
    sequence = [{"frame": 1, "enabled": True, "rotation": 0, **pct_box(0)},
                {"frame": FRAMES, "enabled": False, "rotation": 0, **pct_box(FRAMES - 1)}]  # fmt: skip
    return [{"id": "gt", "type": "videorectangle", "from_name": "box", "to_name": "video",
             "value": {"labels": [label_of(kind)], "framesCount": FRAMES, "sequence": sequence}}]  # fmt: skip


def truth_polygons(kind: str, frames: int, image: str) -> list[dict]:
    results = []
    for t in range(frames):
        item = {"id": f"gt{t}", "type": "polygonlabels", "from_name": "tag", "to_name": image,
                "original_width": W, "original_height": H,
                "value": {"points": pct_polygon(t), "closed": True, "polygonlabels": [label_of(kind)]}}  # fmt: skip
        results.append({**item, "item_index": t} if frames > 1 else item)
    return results


def truth_mask(t: int) -> np.ndarray:
    x0, y0, x1, y1 = dominant(t)
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def track_iou(kind: str, predicted: list[dict]) -> float:
    """The best track IoU of the true track with a predicted track of its label (0 when there is
    none): the box IoU summed over the frames either track is drawn on, over the number of those
    frames (boxes as Label Studio interpolates the keyframes)."""
    read = read_results(predicted, task=0, size=lambda *_: (H, W), frames=lambda _: FRAMES)
    truth = {t + 1: np.asarray(dominant(t), dtype=np.float64) for t in range(FRAMES)}
    best = 0.0
    for track in (t for t in read.tracks if t.label == label_of(kind)):
        both = sorted(truth.keys() & track.boxes.keys())
        either = len(truth.keys() | track.boxes.keys())
        if both:
            ious = box_ious(np.stack([truth[f] for f in both]), np.stack([track.boxes[f] for f in both]))
            best = max(best, float(ious.sum()) / either)
    return best


def labelled_iou(kind: str, frames: int, predicted: list[dict]) -> float:
    """Mean over the frames of the IoU of the true object with every predicted region of its label
    on that frame (their union; 0 when there is none)."""
    masks: dict[tuple[str, int], np.ndarray] = {}
    for item in predicted:
        points = np.asarray(item["value"]["points"], dtype=np.float64) * [W / 100, H / 100]
        key = (item["value"]["polygonlabels"][0], int(item.get("item_index") or 0))
        masks[key] = masks.get(key, np.zeros((H, W), bool)) | polygons_mask([points], H, W)
    scores = []
    for t in range(frames):
        found, truth = masks.get((label_of(kind), t), np.zeros((H, W), bool)), truth_mask(t)
        scores.append(float((found & truth).sum() / (found | truth).sum()))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A video, a frame sequence and an image of each kind."""
    folder = tmp_path_factory.mktemp("learning-media")
    for kind, seed in KINDS.items():
        write_video(folder / f"{kind}.mp4", frames_of(kind, FRAMES, seed), 24)
        for t, frame in enumerate(frames_of(kind, SEQUENCE, seed + 10)):
            Image.fromarray(frame).save(folder / f"{kind}-{t}.png")
        Image.fromarray(frames_of(kind, 1, seed + 20)[0]).save(folder / f"image-{kind}.png")
    host = WebHost(folder)
    yield folder, host
    host.stop()


@pytest.fixture(scope="module")
def poor_classes(tmp_path_factory):
    """Class folders where every other picture is of the other class."""
    root = tmp_path_factory.mktemp("poor-classes")
    rng = np.random.default_rng(2)
    for name, other in (("tomato", "sky"), ("sky", "tomato")):
        (root / name).mkdir()
        for i in range(6):
            side = int(rng.integers(48, 88))
            x0, y0 = (int(v) for v in rng.integers(0, 96 - side, size=2))
            shown = other if i % 2 else name
            image = scene((96, 96), [(shown, (x0, y0, x0 + side, y0 + side))], seed=200 + 10 * i + len(name))
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def learner(label_studio, redis_url, poor_classes, tiny_settings, tiny_engine, tmp_path_factory):
    """usam serve and one RQ worker, sharing USAM_MODEL_DIR, the shared head trained on the poor classes."""
    models = tmp_path_factory.mktemp("learning-models")
    train_from_folders(tiny_settings, poor_classes, models / "heads" / "poor.pt", engine=tiny_engine, epochs=30,
                       progress=False)  # fmt: skip
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_SCORE_THRESHOLD": "0.2",
        "USAM_MODEL_DIR": str(models), "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("learning-cache")),
        "USAM_ALLOWED_HOSTS": "127.0.0.1", "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.personal_token(), "USAM_AUTO_TRAIN": "false", "USAM_RETRAIN_EVERY": "2",
        "USAM_DATA_SOURCE": "folder", "USAM_DATA_DIR": str(poor_classes), "USAM_TRAIN_EPOCHS": "30",
        "USAM_VIDEO_STRIDE": "3", "USAM_VIDEO_CHUNK": "24", "REDIS_URL": redis_url, "USAM_QUEUE": "usam-learning",
    }  # fmt: skip
    server = UsamServer(env, models / "serve.log")
    log = (models / "worker.log").open("w")
    worker = run_worker(env, burst=False, log=log)
    server.env = env  # type: ignore[attr-defined]
    yield server
    worker.terminate()
    worker.wait(timeout=60)
    log.close()
    server.stop()


def preannotate(env: dict[str, str], pid: int) -> str:
    command = [sys.executable, "-m", "usam_backend.cli", "preannotate", "--project", str(pid), "--timeout", "400"]
    run = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def feedback_job(learner, pid: int) -> dict:
    def finished() -> list[dict]:
        jobs = learner.client.get("/jobs").json()["jobs"]
        return [j for j in jobs if j["kind"] == "feedback" and j["project"] == str(pid)
                and j["status"] in ("finished", "failed")]  # fmt: skip

    wait_until(lambda: bool(finished()), 400, f"project {pid}'s retraining on the worker")
    (job,) = finished()
    assert job["status"] == "finished", job
    return job


def latest(sdk, task: int, version: str | None = None) -> tuple[str, list[dict]]:
    predictions = [p for p in sdk.predictions.list(task=task) if version is None or p.model_version == version]
    assert predictions, f"task {task} has no prediction" + (f" of {version}" if version else "")
    return predictions[-1].model_version, predictions[-1].result


def test_video_tracks_teach_the_head_and_the_held_out_videos_tracks_improve(label_studio, learner, media):
    folder, _ = media
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="learning video", label_config=project_config("video_tracks.xml", LABELS)).id
    for kind in KINDS:
        label_studio.upload(pid, folder / f"{kind}.mp4", "video/mp4")
    tasks = dict(zip(KINDS, sorted(t.id for t in sdk.tasks.list(project=pid)), strict=True))
    sdk.ml.create(url=learner.url, project=pid, title="usam")
    assert "predicted 4" in preannotate(learner.env, pid)
    version, _ = latest(sdk, tasks["held-sky"])
    before = [track_iou(kind, latest(sdk, tasks[kind], version)[1]) for kind in HELD_OUT]

    for kind in ANNOTATED:
        sdk.annotations.create(id=tasks[kind], result=truth_track(kind))
    job = feedback_job(learner, pid)
    assert job["trigger"] == "2 new annotations" and job["result"]["feedback"]["annotated_tasks"] == 2
    health = learner.health()["projects"][str(pid)]["feedback"]
    print(f"\n/health, video project: {health}")
    assert health["by_shape"] == {"video/videorectangle": 2} and health["not_learnable"] == 0
    assert sum(health["regions"].values()) > 0  # the predicted tracks were compared with the truth

    new_version = job["result"]["version"]
    assert new_version != version
    held = [tasks[kind] for kind in HELD_OUT]
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": False, "included": held})
    wait_until(lambda: all(any(p.model_version == new_version for p in sdk.predictions.list(task=t)) for t in held),
               300, "the held-out videos' predictions by the new head")  # fmt: skip
    after = [track_iou(kind, latest(sdk, tasks[kind], new_version)[1]) for kind in HELD_OUT]
    print(f"video, held-out videos' track IoU (tomato, sky): {np.round(before, 3).tolist()} before -> "
          f"{np.round(after, 3).tolist()} after; mean {np.mean(before):.3f} -> {np.mean(after):.3f} "
          f"(instances {job['result']['feedback']['instances']})")  # fmt: skip
    assert np.mean(after) > np.mean(before) + 0.2


@pytest.mark.parametrize("shape", ["sequence", "image"])
def test_polygons_on_frame_sequences_and_images_teach_the_head(label_studio, learner, media, shape):
    _, host = media
    sdk = label_studio.sdk
    template, field, image = {"sequence": ("frame_sequence_polygons.xml", "frames", "frames"),
                              "image": ("polygons.xml", "image", "image")}[shape]  # fmt: skip
    frames = SEQUENCE if shape == "sequence" else 1
    pid = sdk.projects.create(title=f"learning {shape}", label_config=project_config(template, LABELS)).id
    if shape == "sequence":
        data = {kind: [f"{host.url}/{kind}-{t}.png" for t in range(SEQUENCE)] for kind in KINDS}
    else:
        data = {kind: f"{host.url}/image-{kind}.png" for kind in KINDS}
    sdk.projects.import_tasks(id=pid, request=[{field: data[kind]} for kind in KINDS])
    tasks = dict(zip(KINDS, sorted(t.id for t in sdk.tasks.list(project=pid)), strict=True))
    sdk.ml.create(url=learner.url, project=pid, title="usam")
    select_all = {"all": True, "excluded": []}
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items=select_all)

    def scores(version: str) -> list[float]:
        return [labelled_iou(kind, frames, latest(sdk, tasks[kind], version)[1]) for kind in HELD_OUT]

    before = scores(latest(sdk, tasks["held-sky"])[0])
    for kind in ANNOTATED:
        sdk.annotations.create(id=tasks[kind], result=truth_polygons(kind, frames, image))
    job = feedback_job(learner, pid)
    health = learner.health()["projects"][str(pid)]["feedback"]
    print(f"\n/health, {shape} project: {health}")
    assert health["by_shape"] == {f"{shape}/polygon": 2 * frames}
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items=select_all)
    after = scores(job["result"]["version"])
    print(f"{shape} polygons, held-out labelled IoU (tomato, sky): {np.round(before, 3).tolist()} before -> "
          f"{np.round(after, 3).tolist()} after; mean {np.mean(before):.3f} -> {np.mean(after):.3f} "
          f"(instances {job['result']['feedback']['instances']})")  # fmt: skip
    assert np.mean(after) > np.mean(before) + 0.2
