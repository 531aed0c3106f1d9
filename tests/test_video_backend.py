"""Video and frame sequences in the backend: label configs, videorectangle results, frame-sequence
predictions and smart-brush propagation with the tiny SAM, the hand-off of video tasks to jobs,
and the chunking of long videos."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from usam_backend.core.settings import Settings
from usam_backend.jobs.policy import VideoShape
from usam_backend.jobs.video import LINK_CLAIM_SECONDS, chunk_store, plan_chunks, video_results
from usam_backend.labelstudio.config import LabelConfigError, parse_label_config
from usam_backend.registry import HeadRegistry
from usam_backend.server.service import PredictRequest
from usam_backend.systems.uvosam import Track

from conftest import scene
from helpers import ROOT, WebHost, tiny_backend

VIDEO = """<View><Video name="video" value="$video" {rate}/><VideoRectangle name="box" toName="video"/>
<Labels name="videoLabels" toName="video"><Label value="Sky" predicted_values="sky"/><Label value="tomato"/></Labels>
</View>"""
FRAMES = """<View><Image name="frames" valueList="$frames"/><BrushLabels name="tag" toName="frames" smart="true">
<Label value="Sky" predicted_values="sky"/><Label value="tomato"/></BrushLabels></View>"""
H, W = 120, 160
SHAPE = VideoShape(stride=5, chunk=240, max_frames=3000, max_pixels=10**7)


@pytest.mark.parametrize(("attribute", "rate"), [("", 24.0), ('frameRate="25"', 25.0), ('framerate="29.97"', 29.97),
                                                  ('FRAMERATE="12"', 12.0)])  # fmt: skip
def test_video_configs_and_their_frame_rate(attribute, rate):
    config = parse_label_config(VIDEO.format(rate=attribute))
    assert config.videos["video"].frame_rate == rate and config.videos["video"].key == "video"
    assert [(label.value, label.control, label.image, label.kind) for label in config.labels] == [
        ("Sky", "box", "video", "videorectangle"), ("tomato", "box", "video", "videorectangle")
    ]  # fmt: skip
    assert config.images == {}


def test_a_frame_rate_from_task_data():
    from usam_backend.jobs.video import frame_rate

    config = parse_label_config(VIDEO.format(rate='frameRate="$fps"'))
    assert config.videos["video"].frame_rate_key == "fps"
    assert frame_rate(config, {"data": {"video": "v.mp4", "fps": "29.97"}}) == 29.97
    assert frame_rate(config, {"data": {"video": "v.mp4"}}) == 24.0  # missing: Label Studio's default
    assert frame_rate(config, {"data": {"fps": "fast"}}) == 24.0
    assert frame_rate(parse_label_config(VIDEO.format(rate='frameRate="30"')), {"data": {"fps": 5}}) == 30.0


def test_frame_sequence_configs_templates_and_bad_configs():
    config = parse_label_config(FRAMES)
    assert config.images["frames"].sequence and config.images["frames"].key == "frames"
    assert config.prompt_tools == {}
    for template in ("video_tracks.xml", "frame_sequence_brush.xml"):
        shipped = parse_label_config((ROOT / "label_config" / template).read_text())
        assert {label.value for label in shipped.labels} == {"cat", "dog", "person"}
    with pytest.raises(LabelConfigError, match="frameRate 'fast'"):
        parse_label_config(VIDEO.format(rate='frameRate="fast"'))
    with pytest.raises(LabelConfigError, match="frames per second"):
        parse_label_config(VIDEO.format(rate='frameRate="0"'))
    mixed = VIDEO.format(rate="").replace("</View>", FRAMES.replace("<View>", "").replace("</View>", "") + "</View>")
    with pytest.raises(LabelConfigError, match="one kind per project"):  # images would never be predicted
        parse_label_config(mixed)
    no_rectangle = VIDEO.format(rate="").replace('<VideoRectangle name="box" toName="video"/>', "")
    with pytest.raises(LabelConfigError, match="VideoRectangle"):
        parse_label_config(no_rectangle)


def test_video_results_are_valid_label_studio_tracks(trained_head, tmp_path):
    """A track seen on frames 0, 4, 8 (then lost) and again on 20, 24, in a 24 fps video of a
    config that says 25 fps: 1-based frames at Label Studio's rate, enabled where it goes on."""
    head_path = tmp_path / "heads" / "head.pt"
    trained_head.save(head_path)
    xml = VIDEO.format(rate='frameRate="25"')
    config = parse_label_config(xml)
    choice = HeadRegistry(tmp_path / "heads", "tiny").choose(config.labels, None)
    track = Track(1, class_id=choice.served["tomato"])
    for f in (0, 4, 8, 20, 24):
        track.boxes[f] = np.array([10.0 + f, 20.0, 50.0 + f, 60.0])
        track.scores[f] = 0.8
    for f in range(1, 8):  # interpolated between sightings
        track.boxes.setdefault(f, track.boxes[0])
    for f in range(21, 24):
        track.boxes[f] = track.boxes[20]
    clip = {"fps": 24.0, "frame_count": 48, "width": W, "height": H}
    (region,) = video_results({1: track}, config, choice, 7, 4, clip)
    assert region["type"] == "videorectangle" and region["from_name"] == "box" and region["to_name"] == "video"
    value = region["value"]
    assert value["labels"] == ["tomato"] and value["framesCount"] == 50 and value["duration"] == 2.0
    frames = [(k["frame"], k["enabled"]) for k in value["sequence"]]
    assert frames == [(1, True), (5, True), (9, False), (22, True), (26, False)]
    first = value["sequence"][0]
    assert (first["x"], first["y"], first["width"], first["height"]) == (6.25, 16.6667, 25.0, 33.3333)
    assert first["time"] == pytest.approx(1 / 25)
    assert LabelInterface(xml).validate_prediction({"result": [region], "score": 0.8, "model_version": "v"})
    fast = Track(3, class_id=choice.served["tomato"])  # a 240 fps file, frameRate 25: two keyframes on one frame
    for f in (0, 4, 8):
        fast.boxes[f], fast.scores[f] = np.array([10.0, 20, 50, 60]), 0.8
    (region,) = video_results({3: fast}, config, choice, 7, 4, {**clip, "fps": 240.0})
    assert [k["frame"] for k in region["value"]["sequence"]] == [1, 2]
    assert region["value"]["framesCount"] == 5  # 48 frames at 240 fps = 0.2 s
    other = Track(2, class_id=99)  # a class no label of the video asks for
    other.boxes[0], other.scores[0] = np.array([0, 0, 5, 5.0]), 0.9
    assert video_results({2: other}, config, choice, 7, 4, clip) == []


def test_chunks_start_on_strided_frames():
    assert plan_chunks(100, 30, 4) == [(0, 28), (28, 56), (56, 84), (84, 100)]
    assert plan_chunks(10, 240, 5) == [(0, 10)]
    assert plan_chunks(7, 2, 5) == [(0, 5), (5, 7)]


def check_store(store) -> None:
    """One caller links (the owner token releases only its own claim); an error chunk is not done."""
    assert store.load([(0, 5), (5, 7)]) is None
    store.put(0, {"frames": []})
    store.put(5, {"error": "frames 5-6: corrupt"})
    assert store.has(0) and not store.has(5)  # a failed chunk is computed again
    assert store.load([(0, 5), (5, 7)]) == [{"frames": []}, {"error": "frames 5-6: corrupt"}]
    token = store.claim()
    assert token and store.claim() is None
    store.release("not-the-owner")
    assert store.claim() is None  # a stranger cannot release the claim
    store.release(token)
    token = store.claim()
    assert token
    store.clear()
    store.release(token)
    assert store.load([(0, 5)]) is None  # linked: a late caller finds nothing


def test_chunk_claims_on_disk(tmp_path):
    store = chunk_store(Settings(model_dir=tmp_path), "3", 9, "v1", SHAPE)
    check_store(store)
    token = store.claim()
    import os

    os.utime(store.marker, (0, 0))  # its holder died while linking, long ago
    assert store.claim() is not None and store.claim() is None
    store.release(token)  # the dead holder's token no longer releases anything
    assert store.claim() is None


def test_chunk_claims_in_redis(redis_url):
    from redis import Redis

    store = chunk_store(Settings(redis_url=redis_url), "3", 9, "v1", SHAPE)
    check_store(store)
    token = store.claim()
    ttl = Redis.from_url(redis_url).pttl(store.lock)
    assert 0 < ttl <= LINK_CLAIM_SECONDS * 1000  # a dead linker's claim expires by itself
    store.release(token)
    other = chunk_store(Settings(redis_url=redis_url), "3", 9, "v1", VideoShape(3, 240, 3000, 10**7))
    assert other.chunks != store.chunks  # chunks computed with other settings are not mixed


def test_video_jobs_carry_the_settings_that_shape_them():
    from usam_backend.jobs.policy import video_chunk_jobs, video_task_jobs

    (task_job,) = video_task_jobs("3", [9], trigger="t", version="v1", shape=SHAPE)
    assert VideoShape.from_request(task_job.request, Settings(video_stride=7)) == SHAPE
    (other,) = video_task_jobs("3", [9], trigger="t", version="v1", shape=VideoShape(3, 240, 3000, 10**7))
    assert other.id != task_job.id
    chunks = video_chunk_jobs("3", 9, [(0, 5), (5, 7)], version="v1", shape=SHAPE)
    assert all(VideoShape.from_request(c.request, Settings(video_stride=7)) == SHAPE for c in chunks)
    assert task_job.rerun_after  # a video job that ended is not run again on every /predict


def test_a_failed_or_finished_video_waits_before_it_runs_again():
    import time

    from usam_backend.jobs.runners import RETRY_FAILED_AFTER, should_resubmit

    now = time.time()
    assert not should_resubmit("failed", now, force=False, rerun_after=RETRY_FAILED_AFTER)
    assert not should_resubmit("finished", now, force=False, rerun_after=RETRY_FAILED_AFTER)
    assert should_resubmit("failed", now - RETRY_FAILED_AFTER - 1, force=False, rerun_after=RETRY_FAILED_AFTER)
    assert should_resubmit("finished", now - RETRY_FAILED_AFTER - 1, force=False, rerun_after=RETRY_FAILED_AFTER)
    assert not should_resubmit("finished", now - 10**6, force=False)  # a training job is not re-run


@pytest.fixture
def frames_host(tmp_path, trained_head):
    """Six frames of a tomato moving right and the sky staying, served over HTTP."""
    (tmp_path / "www").mkdir()
    for t in range(6):
        x = 10 + 8 * t
        image = scene((H, W), [("tomato", (x, 30, x + 50, 90)), ("sky", (110, 10, 155, 60))], seed=3)
        Image.fromarray(image).save(tmp_path / "www" / f"{t}.png")
    trained_head.save(tmp_path / "models" / "heads" / "head.pt")
    host = WebHost(tmp_path / "www")
    yield host, tmp_path
    host.stop()


backend_for = tiny_backend


def test_a_frame_sequence_gets_one_region_per_track_per_frame(frames_host):
    host, tmp_path = frames_host
    backend = backend_for(tmp_path, video_stride=2)
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(6)]}}
    (prediction,) = backend.predict(PredictRequest(tasks=[task], label_config=FRAMES))
    results = prediction["result"]
    assert results, "the head found nothing on any frame"
    assert LabelInterface(FRAMES).validate_prediction(prediction)
    assert {r["item_index"] for r in results} <= set(range(6))
    assert len({r["id"] for r in results}) == len(results)
    for region in results:
        assert (region["original_width"], region["original_height"]) == (W, H)
        assert region["value"]["brushlabels"][0] in ("Sky", "tomato")
        assert (decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127).any()
    per_frame = {}
    for region in results:  # a track has at most one region per frame
        key = (region["item_index"], region["value"]["brushlabels"][0], region["score"])
        per_frame[key] = per_frame.get(key, 0) + 1
    assert max(per_frame.values()) == 1

    broken = {"id": 5, "data": {"frames": "not a list"}}
    (empty,) = backend.predict(PredictRequest(tasks=[broken], label_config=FRAMES))
    assert empty["result"] == []
    assert "must be a list of image URLs" in backend.failures[-1]["reason"]
    from dataclasses import replace

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend.tasks, "limits", replace(backend.tasks.limits, max_pixels=3 * H * W))  # 3 frames' worth
        (empty,) = backend.predict(PredictRequest(tasks=[task], label_config=FRAMES))
    assert empty["result"] == [] and "pixels in all" in backend.failures[-1]["reason"]
    too_many = backend_for(tmp_path, sequence_max_frames=3)
    (empty,) = too_many.predict(PredictRequest(tasks=[task], label_config=FRAMES))
    assert empty["result"] == [] and "USAM_SEQUENCE_MAX_FRAMES=3" in too_many.failures[-1]["reason"]


def stroke(item_index: int, rid: str = "s1") -> dict:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[35:85, 20:60] = 255
    return {
        "id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "frames", "origin": "manual",
        "original_width": W, "original_height": H, "image_rotation": 0, "item_index": item_index,
        "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["tomato"]},
    }  # fmt: skip


def test_a_smart_brush_stroke_on_one_frame_is_answered_on_its_frame_and_followed(frames_host):
    host, tmp_path = frames_host
    backend = backend_for(tmp_path)
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(6)]}}
    request = PredictRequest(tasks=[task], label_config=FRAMES, params={"context": {"result": [stroke(2)]}})
    (prediction,) = backend.predict(request)
    regions = prediction["result"]
    own = [r for r in regions if r["id"] == "s1"]
    assert len(own) == 1 and own[0]["item_index"] == 2  # accepting it replaces the stroke
    followed = [r for r in regions if r["id"] != "s1"]
    assert all(r["item_index"] != 2 and r["value"]["brushlabels"] == ["tomato"] for r in followed)
    assert LabelInterface(FRAMES).validate_prediction(prediction)
    # strokes of the label on two frames: each refined where it is, nothing followed
    two = PredictRequest(tasks=[task], label_config=FRAMES,
                         params={"context": {"result": [stroke(2), stroke(4, "s2")]}})  # fmt: skip
    (prediction,) = backend.predict(two)
    assert sorted(r["id"] for r in prediction["result"]) == ["s1", "s2"]
    from usam_backend.labelstudio.interactive import PromptError

    with pytest.raises(PromptError, match="frame 9 of a 6-frame sequence"):
        backend.predict(PredictRequest(tasks=[task], label_config=FRAMES, params={"context": {"result": [stroke(9)]}}))
    with pytest.raises(PromptError, match="item_index"):
        backend.predict(PredictRequest(tasks=[task], label_config=FRAMES,
                                       params={"context": {"result": [stroke(-1)]}}))  # fmt: skip


def test_video_tasks_go_to_video_jobs_at_once(frames_host):
    _, tmp_path = frames_host
    backend = backend_for(tmp_path)
    backend.setup("12", VIDEO.format(rate=""), None, None)
    tasks = [{"id": 31, "data": {"video": "/data/upload/12/a.mp4"}}, {"id": 32, "data": {"video": "b.mp4"}}]
    answer = backend.predict(PredictRequest(tasks=tasks, project="12"))
    assert answer == [[], []]  # Label Studio creates no prediction now; the jobs post them
    backend.policy.drain()
    jobs = {job["id"]: job for job in backend.training_status()["jobs"]}
    assert {i for i in jobs if i.startswith("usam-video-12-")} == {
        next(i for i in jobs if "-31-" in i),
        next(i for i in jobs if "-32-" in i),
    }
    assert all(job["kind"] == "video" for i, job in jobs.items() if i.startswith("usam-video-"))
    backend.runner.wait(60)  # they fail: this Label Studio's URL is unknown
    failed = {j["id"]: j for j in backend.training_status()["jobs"] if j["id"].startswith("usam-video-")}
    assert all(job["status"] == "failed" and "LABEL_STUDIO_URL" in job["error"] for job in failed.values())
    assert backend.predict(PredictRequest(tasks=tasks, project="12")) == [[], []]  # the task is opened again
    backend.policy.drain()
    again = {j["id"]: j for j in backend.training_status()["jobs"] if j["id"] in failed}
    assert all(again[i]["ended_at"] == failed[i]["ended_at"] for i in failed)  # not run again (RETRY_FAILED_AFTER)


class BrightObjectOracle:
    """ORACLE standing in for the head on synthetic frames: the bright pixels are one object of
    ``class_id``, found with score 0.9 (it measures the coordinate path, not the head)."""

    def __init__(self, class_id: int):
        self.class_id = class_id

    def segment(self, frame: np.ndarray, classes=None):
        from usam_backend.core.regions import Regions

        mask = frame[..., 0] > 128
        return Regions(mask[None], np.array([self.class_id]), np.array([0.9], np.float32),
                       np.zeros((1, 2), np.float32), np.ones(1, np.float32), ("sky", "tomato"))  # fmt: skip


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_phone_video_is_tracked_in_the_picture_people_see(trained_head, tmp_path, monkeypatch, rotation):
    """A clip coded sideways with a display rotation (as phones write portrait video): the chunk's
    size and the videorectangle's percent coordinates are those of the displayed frames."""
    import av

    import usam_backend.jobs.video as video_jobs
    from training.progress import Progress
    from usam_backend.labelstudio.projects import ProjectRecord
    from usam_backend.systems.uvosam import track_boxes

    height, width, n = 160, 96, 10  # as displayed: portrait
    shown = []
    for t in range(n):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[20 + 3 * t : 50 + 3 * t, 10:40] = 255  # a square moving down the left side
        shown.append(frame)
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        coded_h, coded_w = (height, width) if rotation == 180 else (width, height)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        stream.set_display_rotation(rotation)
        for frame in shown:  # displayed = rot90(coded, rotation / 90): code it turned back
            coded = np.ascontiguousarray(np.rot90(frame, k=-(rotation // 90)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded, "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    trained_head.save(tmp_path / "heads" / "head.pt")
    xml = VIDEO.format(rate="")
    config = parse_label_config(xml)
    choice = HeadRegistry(tmp_path / "heads", "tiny").choose(config.labels, None)
    oracle = BrightObjectOracle(choice.served["tomato"])
    monkeypatch.setattr(video_jobs.SemanticSegmenter, "from_settings", lambda *a, **k: oracle)
    monkeypatch.setattr(video_jobs, "shared_engine", lambda settings: None)
    settings = Settings(model_dir=tmp_path, sam_type="tiny")
    job = video_jobs.VideoJob(settings, "3", 9, ProjectRecord("3", xml), config, choice, SHAPE)
    store = job.store()
    video_jobs._detect_chunk(job, store, path, 0, n, last=True, rate=24.0, progress=Progress(bars=False))
    (part,) = store.load([(0, n)])
    assert (part["width"], part["height"]) == (width, height)
    found = [(np.array(f["boxes"]), np.array(f["scores"]), np.array(f["classes"])) for f in part["frames"]]
    tracks = track_boxes(found, frames=[f["index"] for f in part["frames"]], min_hits=1)
    (region,) = video_results(tracks, config, choice, 9, SHAPE.stride, part)
    for key in region["value"]["sequence"]:
        t = key["frame"] - 1
        expected = (10 / width * 100, (20 + 3 * t) / height * 100, 30 / width * 100, 30 / height * 100)
        got = (key["x"], key["y"], key["width"], key["height"])
        assert np.allclose(got, expected, atol=3.5), (t, got, expected)  # within a couple of pixels (codec)


@pytest.fixture
def clip_job(trained_head, tmp_path):
    """A 24-frame mp4 served over HTTP, and the VideoJob of a task pointing at it."""
    from usam_backend.core.video import write_video
    from usam_backend.jobs.video import VideoJob
    from usam_backend.labelstudio.projects import ProjectRecord

    (tmp_path / "www").mkdir()
    frames = [scene((H, W), [("tomato", (10 + 3 * t, 30, 60 + 3 * t, 90))], seed=3) for t in range(24)]
    write_video(tmp_path / "www" / "clip.mp4", frames, 24)
    trained_head.save(tmp_path / "heads" / "head.pt")
    xml = VIDEO.format(rate="")
    config = parse_label_config(xml)
    choice = HeadRegistry(tmp_path / "heads", "tiny").choose(config.labels, None)
    host = WebHost(tmp_path / "www")
    settings = Settings(model_dir=tmp_path / "models", cache_dir=tmp_path / "cache", allowed_hosts=("127.0.0.1",),
                        sam_type="tiny", device="cpu", points=64)  # fmt: skip
    job = VideoJob(settings, "3", 9, ProjectRecord("3", xml), config, choice, SHAPE)
    yield job, host
    host.stop()


class TaskApi:
    """Label Studio's task endpoint, for the jobs' download step (the rest of the API is not used)."""

    def __init__(self, url: str):
        self.url = url

    def task(self, task_id: int) -> dict:
        return {"id": task_id, "data": {"video": self.url}}


def test_a_worker_downloads_a_video_once(clip_job):
    import httpx

    job, host = clip_job
    api = TaskApi(f"{host.url}/clip.mp4")
    with httpx.Client() as client:
        first, _ = job.video(api, client)
        second, _ = job.video(api, client)  # the next chunk job on this worker
    assert first == second and first.stat().st_size > 0
    assert [path for path, _ in host.requests] == ["/clip.mp4"]


def test_an_error_in_a_later_chunk_reaches_the_job_and_nothing_is_posted(clip_job):
    """The container said 12 frames but the file goes on past the frame limit: the open last chunk
    stops at the limit with an error; its job fails with it and the linker refuses to post."""
    from dataclasses import replace

    import httpx

    from training.progress import Progress
    from usam_backend.core.errors import UsamError
    from usam_backend.jobs.video import _detect_chunk, _link_and_post

    job, host = clip_job
    job.shape = replace(SHAPE, max_frames=12)
    with httpx.Client() as client:
        source, _ = job.video(TaskApi(f"{host.url}/clip.mp4"), client)
    store = job.store()
    chunks = [(0, 6), (6, 12)]
    _detect_chunk(job, store, source, 0, 6, last=False, rate=24.0, progress=Progress(bars=False))
    with pytest.raises(UsamError, match=r"frames 6-11 of video task 9: .*more than 6 frames to decode"):
        _detect_chunk(job, store, source, 6, 12, last=True, rate=24.0, progress=Progress(bars=False))
    assert store.has(0) and not store.has(6)  # a re-run computes the failed chunk again
    with pytest.raises(UsamError, match="video task 9 was not posted: frames 6-11"):
        _link_and_post(job, None, store, chunks)  # no API call: nothing is posted
    assert store.claim() is not None  # the claim was released


def test_a_smart_brush_stroke_is_followed_on_the_other_frames_with_an_oracle(frames_host, monkeypatch):
    """The tiny random SAM's masks are noise, so following finds nothing with it; with the box
    ORACLE of tests/video_scenes.py as SAM over the served frames, a rough stroke around the tomato
    on frame 2 is refined to the tomato and followed onto every other frame, always on the tomato."""
    from video_scenes import Scene, VideoOracle

    import usam_backend.labelstudio.tasks as tasks

    host, tmp_path = frames_host
    frames = [np.asarray(Image.open(tmp_path / "www" / f"{t}.png").convert("RGB")) for t in range(6)]
    objects = []
    for t in range(6):  # as frames_host draws them: the tomato moves 8 px a frame, the sky stays
        ids = np.zeros((H, W), np.int32)
        ids[30:90, 10 + 8 * t : 60 + 8 * t] = 1
        ids[10:60, 110:155] = 2
        objects.append(ids)
    oracle = VideoOracle(Scene(frames, objects, {1: 1, 2: 0}))
    monkeypatch.setattr(tasks, "EnginePredictor", lambda engine: oracle)
    backend = backend_for(tmp_path)
    monkeypatch.setattr(backend.tasks, "engine", lambda: None)  # SAM is the oracle: no model is loaded
    rough = np.zeros((H, W), np.uint8)
    rough[24:96, 20:84] = 255  # frame 2's tomato (x 26-76, y 30-90) and some background around it
    drawn = {**stroke(2), "value": {"format": "rle", "rle": mask2rle(rough), "brushlabels": ["tomato"]}}
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(6)]}}
    request = PredictRequest(tasks=[task], label_config=FRAMES, params={"context": {"result": [drawn]}})
    (prediction,) = backend.predict(request)
    assert LabelInterface(FRAMES).validate_prediction(prediction)
    masks = {
        r["item_index"]: decode_rle(r["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127 for r in prediction["result"]
    }
    (own,) = [r for r in prediction["result"] if r["id"] == "s1"]
    assert own["item_index"] == 2 and np.array_equal(masks[2], objects[2] == 1)  # refined to the tomato
    followed = [r for r in prediction["result"] if r["id"] != "s1"]
    assert sorted(r["item_index"] for r in followed) == [0, 1, 3, 4, 5]
    assert all(r["value"]["brushlabels"] == ["tomato"] for r in followed)
    for t in (0, 1, 3, 4, 5):
        tomato = objects[t] == 1
        assert not (masks[t] & ~tomato).any(), f"frame {t}: off the tomato"
        print(f"frame {t}: {masks[t].sum() / tomato.sum():.0%} of the tomato")
        assert masks[t].sum() >= 0.8 * tomato.sum(), f"frame {t}: {masks[t].sum()} of {tomato.sum()} pixels"
