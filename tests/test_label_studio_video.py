"""End to end against a real Label Studio 1.23.2: videos and frame sequences.

A real mp4 uploaded to Label Studio is pre-annotated with videorectangle tracks by ``usam
preannotate`` (in process, in chunks), by RQ workers (chunks fanned out over the queue), and through
*Retrieve predictions* (``/predict`` hands the video to a job that posts the prediction). A frame
sequence task gets brush regions with ``item_index`` through *Retrieve predictions*, and a smart
brush stroke on one frame through ``interactive-annotating``. Label Studio stores and returns them;
every result is checked with the SDK's validator."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from usam_backend.core.video import write_video

from conftest import scene
from helpers import ROOT, UsamServer, WebHost, project_config, run_worker, wait_until

pytestmark = pytest.mark.labelstudio

LABELS = {"Sky": "sky", "tomato": None}
H, W, FRAMES = 160, 240, 24


def frames() -> list[np.ndarray]:
    """The tomato crosses the frame left to right; the sky stays."""
    out = []
    for t in range(FRAMES):
        x = 10 + 5 * t
        out.append(scene((H, W), [("tomato", (x, 40, x + 70, 130)), ("sky", (150, 10, 230, 70))], seed=5))
    return out


def write_portrait(path, shown: list[np.ndarray]):
    """A phone's portrait clip: coded sideways (landscape) with a 90-degree display rotation."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = shown[0].shape[0], shown[0].shape[1], "yuv420p"
        stream.set_display_rotation(90)
        for frame in shown:  # displayed = rot90(coded): code it turned back
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(frame, -1)), "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-media")
    clip = write_video(folder / "tomato.mp4", frames(), 24)
    write_portrait(folder / "portrait.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in frames()])
    for t, frame in enumerate(frames()[:6]):
        Image.fromarray(frame).save(folder / f"{t}.png")
    host = WebHost(folder)
    yield clip, host
    host.stop()


@pytest.fixture(scope="module")
def usam_video(label_studio, trained_head, tmp_path_factory):
    models = tmp_path_factory.mktemp("usam-video-models")
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_SCORE_THRESHOLD": "0.2",
        "USAM_MODEL_DIR": str(models), "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("usam-video-cache")),
        "USAM_ALLOWED_HOSTS": "127.0.0.1", "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.personal_token(), "USAM_AUTO_TRAIN": "false", "USAM_RETRAIN_EVERY": "0",
        "USAM_VIDEO_STRIDE": "2", "USAM_VIDEO_CHUNK": "8",
    }  # fmt: skip
    server = UsamServer(env, models / "serve.log")
    server.env = env  # type: ignore[attr-defined]
    yield server
    server.stop()


def video_project(label_studio, clip, title: str) -> tuple[int, int, str]:
    config = project_config("video_tracks.xml", LABELS)
    pid = label_studio.sdk.projects.create(title=title, label_config=config).id
    label_studio.upload(pid, clip, "video/mp4")
    (task,) = [t.id for t in label_studio.sdk.tasks.list(project=pid)]
    return pid, task, config


def check_tracks(label_studio, task: int, config: str) -> list[dict]:
    (stored,) = label_studio.sdk.predictions.list(task=task)
    assert stored.model_version.startswith("usam-")
    assert stored.result, "no track found in the video"
    interface = LabelInterface(config)
    assert interface.validate_prediction({"result": stored.result, "score": stored.score or 0.0,
                                          "model_version": stored.model_version})  # fmt: skip
    for region in stored.result:
        value = region["value"]
        assert region["type"] == "videorectangle" and region["from_name"] == "box" and region["to_name"] == "video"
        assert value["labels"][0] in LABELS and value["framesCount"] == FRAMES and value["duration"] == 1.0
        keyframes = [k["frame"] for k in value["sequence"]]
        assert keyframes == sorted(keyframes) and keyframes[0] >= 1 and keyframes[-1] <= FRAMES
        assert not value["sequence"][-1]["enabled"]  # the track ends
        assert all(0 <= k["x"] <= 100 and 0 < k["width"] <= 100 for k in value["sequence"])
    return stored.result


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "usam_backend.cli", *args]
    return subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_usam_preannotate_tracks_a_video_in_chunks(label_studio, usam_video, media, tmp_path):
    """A landscape clip and a phone's portrait clip (coded sideways, turned by its display matrix)."""
    clip, _ = media
    pid, task, config = video_project(label_studio, clip, "video preannotate")
    label_studio.upload(pid, clip.with_name("portrait.mp4"), "video/mp4")
    (portrait,) = [t.id for t in label_studio.sdk.tasks.list(project=pid) if t.id != task]
    env = {**usam_video.env, "USAM_MODEL_DIR": usam_video.env["USAM_MODEL_DIR"]}
    run = run_cli(["preannotate", "--project", str(pid)], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 of 2 task(s) lack" in run.stdout and "predicted 2" in run.stdout
    check_tracks(label_studio, task, config)
    check_tracks(label_studio, portrait, config)
    again = run_cli(["preannotate", "--project", str(pid)], env)
    assert again.returncode == 0 and "0 of 2 task(s) lack" in again.stdout


def test_rq_workers_share_a_videos_chunks(label_studio, usam_video, media, redis_url, tmp_path):
    clip, _ = media
    pid, task, config = video_project(label_studio, clip, "video on workers")
    env = {**usam_video.env, "REDIS_URL": redis_url, "USAM_QUEUE": "usam-video"}
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = run_worker(env, burst=False, log=sink)
        try:
            run = run_cli(["preannotate", "--project", str(pid), "--timeout", "500"], env)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    output = log.read_text()
    assert run.returncode == 0, run.stdout + run.stderr + output
    assert "queued 1 job(s)" in run.stdout and "predicted 1" in run.stdout
    assert output.count("Job OK") >= 4, output  # the task job and its 3 chunk jobs (24 frames, 8 per chunk)
    check_tracks(label_studio, task, config)


def test_retrieve_predictions_hands_a_video_to_a_job(label_studio, usam_video, media):
    clip, _ = media
    pid, task, config = video_project(label_studio, clip, "video retrieve")
    label_studio.sdk.ml.create(url=usam_video.url, project=pid, title="usam")
    label_studio.sdk.actions.create(id="retrieve_tasks_predictions", project=pid,
                                    selected_items={"all": True, "excluded": []})  # fmt: skip
    wait_until(lambda: len(label_studio.sdk.predictions.list(task=task)) == 1, 300, "the video job's prediction")
    check_tracks(label_studio, task, config)
    jobs = usam_video.client.get("/jobs").json()["jobs"]
    assert any(job["kind"] == "video" and job["status"] == "finished" for job in jobs), jobs


def test_frame_sequences_and_the_smart_brush_through_label_studio(label_studio, usam_video, media):
    _, host = media
    config = project_config("frame_sequence_brush.xml", LABELS)
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="frame sequence", label_config=config).id
    sdk.projects.import_tasks(id=pid, request=[{"frames": [f"{host.url}/{t}.png" for t in range(6)]}])
    (task,) = [t.id for t in sdk.tasks.list(project=pid)]
    backend = sdk.ml.create(url=usam_video.url, project=pid, title="usam", is_interactive=True).id
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    (stored,) = sdk.predictions.list(task=task)
    assert stored.result, "nothing found on any frame"
    assert LabelInterface(config).validate_prediction(
        {"result": stored.result, "score": stored.score or 0.0, "model_version": stored.model_version}
    )
    assert {r["item_index"] for r in stored.result} <= set(range(6))  # stored and returned intact
    assert {r["value"]["brushlabels"][0] for r in stored.result} <= set(LABELS)

    stroke = np.zeros((H, W), dtype=np.uint8)
    stroke[45:125, 20:80] = 255  # over the tomato on frame 1 (x 15-85)
    context = {"result": [{
        "id": "stroke1", "type": "brushlabels", "from_name": "tag", "to_name": "frames", "origin": "manual",
        "original_width": W, "original_height": H, "image_rotation": 0, "item_index": 1,
        "value": {"format": "rle", "rle": mask2rle(stroke), "brushlabels": ["tomato"]},
    }]}  # fmt: skip
    response = label_studio.http.post(f"/api/ml/{backend}/interactive-annotating",
                                      json={"task": task, "context": context})  # fmt: skip
    assert response.status_code == 200, response.text
    regions = response.json()["data"]["result"]
    (own,) = [r for r in regions if r["id"] == "stroke1"]
    assert own["item_index"] == 1 and own["value"]["brushlabels"] == ["tomato"]
    assert all(r["item_index"] != 1 for r in regions if r["id"] != "stroke1")  # followed to other frames
