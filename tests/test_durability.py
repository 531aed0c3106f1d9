"""Nothing answered is lost: webhooks answered 200 survive kill -9 of the server right after, and
each event is written out and fsynced before its answer leaves (so it survives a crash of the machine)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import mask2rle
from starlette.types import Message, Receive, Scope, Send

from usam_backend.labelstudio import projects
from usam_backend.server.app import create_app

from helpers import UsamServer, tiny_backend, wait_until

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="tomato"/><Label value="sky"/></BrushLabels></View>"""


def annotation(task: int) -> dict:
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[task : 200 + task, 50:300] = 255
    brush = {
        "id": f"r{task}", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": 512,
        "original_height": 512, "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["sky"]},
    }  # fmt: skip
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 5},
        "annotation": {"id": 1000 + task, "task": task, "result": [brush]},
        "task": {"id": task, "data": {"image": f"/data/upload/5/{task}.png"}},
    }


def test_webhooks_answered_before_a_kill_are_all_folded_in_after_the_restart(tmp_path):
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_MODEL_DIR": str(tmp_path / "models"),
        "USAM_CACHE_DIR": str(tmp_path / "cache"), "USAM_AUTO_TRAIN": "false", "USAM_RETRAIN_EVERY": "0",
    }  # fmt: skip
    server = UsamServer(env, tmp_path / "first.log")
    try:
        assert server.client.post("/setup", json={"project": "5.1", "schema": CONFIG}).status_code == 200
        for task in range(1, 21):
            assert server.client.post("/webhook", json=annotation(task)).status_code == 200
        server.process.send_signal(signal.SIGKILL)  # right after the last answer
        server.process.wait(timeout=20)
    finally:
        server.stop()
    log = Path(env["USAM_MODEL_DIR"]) / "events" / "5.jsonl"
    assert len(log.read_text().splitlines()) == 20
    state_file = Path(env["USAM_MODEL_DIR"]) / "feedback" / "5" / "state.json"
    processed = json.loads(state_file.read_text())["tasks"] if state_file.exists() else 0
    print(f"\nfolded in before the kill: {processed} of 20")

    restarted = UsamServer(env, tmp_path / "second.log")
    try:

        def all_folded_in() -> bool:
            return restarted.health()["projects"]["5"]["feedback"]["annotated_tasks"] == 20

        wait_until(all_folded_in, 60, "the 20 answered annotations in the feedback state")
        feedback = restarted.health()["projects"]["5"]["feedback"]
        assert feedback["regions"]["added"] == 20 and "error" not in feedback
    finally:
        restarted.stop()


def test_the_event_is_fsynced_whole_before_the_webhook_is_answered(tmp_path, monkeypatch):
    """In process: every ``os.fsync`` and every response start are recorded in order. Before each
    answer, the event log's descriptor is fsynced holding all it will hold (written out, not buffered)."""
    backend = tiny_backend(tmp_path, auto_train=False, retrain_every=0)
    app = create_app(backend, loopback_only=True)
    order: list[tuple[str, object]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        stat = os.fstat(fd)
        order.append(("fsync", (stat.st_dev, stat.st_ino, stat.st_size)))
        real_fsync(fd)

    async def answering(scope: Scope, receive: Receive, send: Send) -> None:
        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                order.append(("answer", message["status"]))
            await send(message)

        await app(scope, receive, recorded)

    monkeypatch.setattr(projects.os, "fsync", recording_fsync)
    client = TestClient(answering)
    log = tmp_path / "models" / "events" / "5.jsonl"
    sizes = []
    small = {"action": "ANNOTATIONS_DELETED", "project": {"id": 5}, "annotations": [{"id": 1001}]}
    for event in (annotation(1), small):  # an event longer than a file buffer, and one that fits in it
        del order[:]
        assert client.post("/webhook", json=event).status_code == 200
        stat = log.stat()
        sizes.append(stat.st_size)
        whole_log = ("fsync", (stat.st_dev, stat.st_ino, stat.st_size))
        assert [what for what in order if what[0] == "answer"] == [("answer", 200)]
        assert whole_log in order and order.index(whole_log) < order.index(("answer", 200)), order
    assert sizes[0] < sizes[1] and len(log.read_text().splitlines()) == 2
