"""Frame sequences and video work that other requests can live with: frames checked before they are
decoded, every length of input seen, the compute lock taken per frame and granted in turn, and a
sequence that outlasts USAM_PREDICT_BUDGET handed to a job."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import usam_backend.labelstudio.sequences as sequences
from usam_backend.core.errors import UsamError
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.sam.shared import FairLock
from usam_backend.server.service import PredictRequest
from usam_backend.systems.uvosam import sampled_frames, track_boxes

from conftest import scene
from helpers import WebHost, tiny_backend

FRAMES = """<View><Image name="frames" valueList="$frames"/><BrushLabels name="tag" toName="frames">
<Label value="Sky" predicted_values="sky"/><Label value="tomato"/></BrushLabels></View>"""
H, W = 96, 128


class CountingLock:
    """A lock that counts how often it was taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> CountingLock:
        self.lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@pytest.fixture
def sequence_host(tmp_path, trained_head):
    """Seven frames of a tomato moving right; ``big.png`` and ``tiny.png`` for hostile sequences."""
    www = tmp_path / "www"
    www.mkdir()
    for t in range(7):
        x = 10 + 6 * t
        image = scene((H, W), [("tomato", (x, 20, x + 40, 70)), ("sky", (90, 5, 125, 40))], seed=3)
        Image.fromarray(image).save(www / f"{t}.png")
    Image.new("RGB", (16, 16)).save(www / "tiny.png")
    Image.new("RGB", (1200, 900)).save(www / "big.png")
    trained_head.save(tmp_path / "models" / "heads" / "head.pt")
    host = WebHost(www)
    yield host, tmp_path
    host.stop()


backend_for = tiny_backend


def test_sequence_frames_are_checked_before_they_are_decoded(sequence_host, monkeypatch):
    """A tiny first frame followed by large ones: refused at the second frame, before decoding it."""
    host, _ = sequence_host
    decoded = []
    real = sequences.load_image
    monkeypatch.setattr(sequences, "load_image", lambda raw, **kw: decoded.append(1) or real(raw, **kw))
    settings = Settings(allowed_hosts=("127.0.0.1",))
    limits = sequences.SequenceLimits(max_frames=50, max_frame_pixels=settings.max_image_pixels)
    task = {"id": 1, "data": {"frames": [f"{host.url}/tiny.png"] + [f"{host.url}/big.png"] * 40}}
    import httpx

    with httpx.Client() as client:
        fetcher = fetcher_for(settings, None, client)
        refs = sequences.sequence_refs(task, "frames", limits)
        with pytest.raises(UsamError, match="frame 1 is 1200x900, frame 0 16x16"):
            sequences.fetch_frames(task, refs, fetcher, None, limits)
        assert decoded == [1]  # only the first frame was decoded
        big = {"id": 2, "data": {"frames": [f"{host.url}/big.png"] * 40}}
        with pytest.raises(UsamError, match="pixels in all"):  # 40 x 1.08 MP over a 20 MP budget
            budget = sequences.SequenceLimits(50, settings.max_image_pixels, max_pixels=20_000_000)
            sequences.fetch_frames(big, big["data"]["frames"], fetcher, None, budget)
    assert decoded == [1]  # refused from the first frame's header: nothing more decoded


@pytest.mark.parametrize(
    ("count", "stride", "expected"),
    [(1, 5, [0]), (3, 5, [0, 2]), (5, 5, [0, 4]), (6, 5, [0, 5]), (12, 5, [0, 5, 10, 11]), (10, 1, list(range(10)))],
)
def test_every_length_is_sampled_at_both_ends(count, stride, expected):
    assert sampled_frames(0, count, stride) == expected


def test_a_one_frame_input_gets_tracks_when_min_hits_allows():
    boxes = np.array([[10, 10, 40, 40], [60, 60, 90, 90]], dtype=float)
    found = [(boxes, np.array([0.9, 0.8]), np.array([0, 1]))]
    tracks = track_boxes(found, min_hits=1)
    assert len(tracks) == 2
    assert {t.class_id for t in tracks.values()} == {0, 1}
    assert all(list(t.boxes) == [0] for t in tracks.values())
    assert track_boxes(found, min_hits=2) == {}  # one sighting is not two
    # the last frame of a clip: a new object there is kept too (ByteTrack starts no track on it)
    late = [(boxes[:1], np.array([0.9]), np.array([0]))] * 3 + [(boxes, np.array([0.9, 0.8]), np.array([0, 1]))]
    assert len(track_boxes(late, min_hits=1)) == 2


def test_a_short_sequence_gets_tracks(sequence_host):
    """Three frames with a stride of 5: the head sees frames 0 and 2, and tracks come out."""
    host, tmp_path = sequence_host
    backend = backend_for(tmp_path, video_stride=5)
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(3)]}}
    (prediction,) = backend.predict(PredictRequest(tasks=[task], label_config=FRAMES))
    assert prediction["result"], backend.failures
    assert {r["item_index"] for r in prediction["result"]} <= {0, 1, 2}


def test_the_compute_lock_is_taken_per_frame(sequence_host, monkeypatch):
    host, tmp_path = sequence_host
    backend = backend_for(tmp_path, video_stride=2)
    lock = CountingLock()
    backend.tasks.lock = lock
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(7)]}}
    (prediction,) = backend.predict(PredictRequest(tasks=[task], label_config=FRAMES))
    assert prediction["result"]
    # one pass: each frame's work (SAM's encoder, the head on frames 0, 2, 4 and 6, following) in its own
    # turns, never the whole sequence in one
    assert lock.taken >= 7
    assert backend.sam.engine.encoder_calls == 7  # each frame shown to SAM's encoder once


def test_a_waiting_request_gets_the_lock_between_two_frames():
    """A job taking the lock once per frame, and a request that arrives while the job holds it: the
    request is served after that frame, not after the job."""
    lock = FairLock()
    order: list[str] = []
    holding = threading.Event()

    def job() -> None:
        for frame in range(20):
            with lock:
                order.append(f"frame {frame}")
                holding.set()
                time.sleep(0.01)

    worker = threading.Thread(target=job)
    worker.start()
    holding.wait(5)
    with lock:
        order.append("request")
    worker.join(10)
    assert order.index("request") <= 2, order  # after the frame it waited for (and at most one more)


def test_a_sequence_that_outlasts_the_budget_goes_to_a_job(sequence_host):
    host, tmp_path = sequence_host
    backend = backend_for(tmp_path, video_stride=1, predict_budget=0.01)
    backend.setup("12", FRAMES, None, None)
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(7)]}}
    answer = backend.predict(PredictRequest(tasks=[task], project="12"))
    assert answer == [[]]  # Label Studio gets no prediction now; the job posts it
    backend.policy.drain()
    jobs = backend.training_status()["jobs"]
    assert [(job["kind"], job["project"], job["trigger"]) for job in jobs] == [("preannotate", "12", "predict")]
    assert backend.runner._specs[jobs[0]["id"]].request["tasks"] == [4]


def test_a_smart_brush_session_fetches_a_sequences_frames_once(sequence_host):
    from label_studio_sdk.converter.brush import mask2rle

    host, tmp_path = sequence_host
    backend = backend_for(tmp_path)
    config = FRAMES.replace(
        '<BrushLabels name="tag" toName="frames">', '<BrushLabels name="tag" toName="frames" smart="true">'
    )
    task = {"id": 4, "data": {"frames": [f"{host.url}/{t}.png" for t in range(7)]}}
    drawn = np.zeros((H, W), dtype=np.uint8)
    drawn[20:70, 14:54] = 255
    for rid in ("s1", "s2"):  # two strokes, one after the other, on frame 2
        stroke = {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "frames", "item_index": 2,
                  "original_width": W, "original_height": H,
                  "value": {"format": "rle", "rle": mask2rle(drawn), "brushlabels": ["tomato"]}}  # fmt: skip
        (answer,) = backend.predict(PredictRequest(tasks=[task], label_config=config,
                                                   params={"context": {"result": [stroke]}}))  # fmt: skip
        assert any(r["id"] == rid for r in answer["result"])
    fetched = [path for path, _ in host.requests]
    assert sorted(fetched) == sorted(f"/{t}.png" for t in range(7))  # each frame once for both strokes


def test_the_fair_lock_is_held_by_one_thread_at_a_time():
    lock = FairLock()
    inside, most = [0], [0]

    def work() -> None:
        for _ in range(20):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert most[0] == 1 and inside[0] == 0
