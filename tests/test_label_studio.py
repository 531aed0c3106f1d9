"""End to end against a real Label Studio 1.23.2: usam as its ML backend over real HTTP.

Label Studio runs from its own virtualenv (``make test`` installs it; see the Makefile), with the
environment the contract requires for a backend on loopback. Cloud storage is a local S3 server
(moto) standing in for AWS. Covers: Retrieve predictions over local-files, upload and S3 tasks
(bit-exact masks), a failing image, interactive smart clicks, a label added in Label Studio, and
annotation webhooks; then the legacy-token and personal-access-token paths.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from training import Head
from usam_backend.registry import model_version
from usam_backend.systems.usam import SemanticSegmenter

from conftest import scene
from helpers import LEGACY_TOKEN, ROOT, UsamServer, free_port, project_config, run_worker, wait_until

pytestmark = pytest.mark.labelstudio

WEBHOOK_SECRET = "a-shared-secret"
BASIC_AUTH = ("labelstudio", "connection-password")
LABELS = {"Sky": "sky", "tomato": None}  # label value -> predicted_values


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("task-images")
    shapes = {
        "local": [("tomato", (20, 30, 100, 130)), ("sky", (140, 30, 220, 130))],
        "upload": [("sky", (10, 10, 120, 90))],
        "cloud": [("tomato", (60, 20, 200, 140))],
    }
    paths = {}
    for seed, (name, drawn) in enumerate(shapes.items()):
        paths[name] = folder / f"{name}.png"
        Image.fromarray(scene((160, 240), drawn, seed=20 + seed)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def s3(images):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    client.create_bucket(Bucket="shots")
    client.upload_file(str(images["cloud"]), "shots", "cloud/cloud.png")
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def usam(label_studio, trained_head, class_dir, tmp_path_factory):
    """usam with a personal access token (the modern path) and the trained tiny head."""
    models = tmp_path_factory.mktemp("usam-models")
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny",
        "USAM_DEVICE": "cpu",
        "USAM_POINTS": "64",
        "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("usam-cache")),
        "USAM_ALLOWED_HOSTS": "127.0.0.1",  # the S3 stand-in listens on loopback
        "LABEL_STUDIO_URL": label_studio.url,  # LABEL_STUDIO_API_KEY goes there and nowhere else
        "LABEL_STUDIO_API_KEY": label_studio.personal_token(),
        "USAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BASIC_AUTH_USER": BASIC_AUTH[0],  # Start training reaches /webhook with the connection's basic auth
        "BASIC_AUTH_PASS": BASIC_AUTH[1],
        "USAM_DATA_SOURCE": "folder",  # feedback training reuses the class images the head was trained on
        "USAM_DATA_DIR": str(class_dir),
        "USAM_AUTO_TRAIN": "false",
        "USAM_RETRAIN_EVERY": "0",  # retrain on Start training only
        "USAM_TRAIN_EPOCHS": "30",
    }
    server = UsamServer(env, models / "serve.log")
    server.models = models  # type: ignore[attr-defined]
    server.env = env  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def project(label_studio, usam, images, s3):
    """A project from the interactive template with local-files, upload, S3 and broken tasks."""
    sdk = label_studio.sdk
    config = project_config("interactive_brush.xml", LABELS)
    created = sdk.projects.create(title="usam e2e", label_config=config)
    pid = created.id
    (label_studio.files / "set1").mkdir()
    shutil.copy(images["local"], label_studio.files / "set1" / "local.png")
    local = sdk.import_storage.local.create(
        project=pid, path=str(label_studio.files / "set1"), regex_filter=r".*\.png", use_blob_urls=True
    )
    sdk.import_storage.local.sync(id=local.id)
    label_studio.upload(pid, images["upload"])
    cloud = sdk.import_storage.s3.create(
        project=pid, bucket="shots", prefix="cloud/", regex_filter=r".*\.png", use_blob_urls=True, presign=True,
        aws_access_key_id="test", aws_secret_access_key="test", s3endpoint=s3, region_name="us-east-1",
    )  # fmt: skip
    sdk.import_storage.s3.sync(id=cloud.id)
    sdk.projects.import_tasks(id=pid, request=[{"image": f"{label_studio.url}/data/upload/{pid}/missing.png"}])
    wait_until(lambda: len(list(sdk.tasks.list(project=pid))) == 4, 60, "4 tasks")
    backend = connect(label_studio, usam, pid, interactive=True)
    return {"id": pid, "config": config, "backend": backend}


def connect(label_studio, usam, pid: int, *, interactive: bool = False) -> int:
    """Add usam as the project's ML backend; give the webhook Label Studio registered on its own the
    secret header, as the README says."""
    user, password = (usam.env.get("BASIC_AUTH_USER"), usam.env.get("BASIC_AUTH_PASS"))
    auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password} if user else {}
    backend = label_studio.sdk.ml.create(url=usam.url, project=pid, title="usam", is_interactive=interactive, **auth)
    (hook,) = [
        h for h in label_studio.http.get("/api/webhooks/", params={"project": pid}).json() if "/webhook" in h["url"]
    ]
    patched = label_studio.http.patch(
        f"/api/webhooks/{hook['id']}/", json={"headers": {"X-Usam-Webhook-Secret": WEBHOOK_SECRET}}
    )
    assert patched.status_code == 200, patched.text
    return int(backend.id)


def tasks_by_kind(sdk, pid):
    kinds = {}
    for task in sdk.tasks.list(project=pid):
        reference = task.data["image"]
        kind = "missing" if "missing" in reference else "upload" if "/data/upload/" in reference else None
        kind = kind or ("local" if "local-files" in reference else "cloud")
        kinds[kind] = task
    return kinds


def test_retrieve_predictions_match_the_backends_masks(label_studio, usam, project, images, tiny_engine):
    sdk = label_studio.sdk
    head = Head.load(usam.models / "heads" / "head.pt")
    version = model_version(head, "tiny")
    assert sdk.ml.get(id=project["backend"]).model_version == version

    sdk.actions.create(
        id="retrieve_tasks_predictions", project=project["id"], selected_items={"all": True, "excluded": []}
    )
    segmenter = SemanticSegmenter(tiny_engine, head, points=64, score_threshold=0.5, nms_iou=0.5)
    tasks = tasks_by_kind(sdk, project["id"])
    assert set(tasks) == {"local", "upload", "cloud", "missing"}
    for kind in ("local", "upload", "cloud"):
        (stored,) = sdk.predictions.list(task=tasks[kind].id)
        assert stored.model_version == version
        expected = segmenter.segment(np.asarray(Image.open(images[kind]).convert("RGB")), classes={"sky", "tomato"})
        assert len(stored.result) == len(expected) > 0, kind
        for region, mask, label in zip(stored.result, expected.masks, expected.labels, strict=True):
            decoded = decode_rle(region["value"]["rle"]).reshape(160, 240, 4)[:, :, 3] > 0
            assert np.array_equal(decoded, mask), f"{kind}: stored mask differs from the computed one"
            assert region["value"]["brushlabels"] == [{"sky": "Sky", "tomato": "tomato"}[label]]
    (missing,) = sdk.predictions.list(task=tasks["missing"].id)
    assert missing.result == [] and missing.score == 0.0
    reasons = [failure["reason"] for failure in usam.health()["recent_failures"]]
    assert any("missing.png answered HTTP" in reason for reason in reasons)  # Label Studio says 500 here


def test_interactive_click_through_label_studio(label_studio, usam, project):
    task = tasks_by_kind(label_studio.sdk, project["id"])["local"]
    context = {
        "result": [
            {
                "type": "keypointlabels", "from_name": "point", "to_name": "image", "is_positive": True,
                "original_width": 240, "original_height": 160,
                "value": {"x": 25.0, "y": 50.0, "width": 0.5, "keypointlabels": ["tomato"]},
            }
        ]
    }  # fmt: skip
    passes = usam.health()["sam"]["encoder_passes"]
    response = label_studio.http.post(
        f"/api/ml/{project['backend']}/interactive-annotating", json={"task": task.id, "context": context}
    )
    assert response.status_code == 200, response.text
    (region,) = response.json()["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["tomato"]
    assert usam.health()["sam"]["encoder_passes"] == passes  # the image was embedded by the batch already


def test_smart_brush_strokes_come_back_refined_through_label_studio(label_studio, usam, project):
    task = tasks_by_kind(label_studio.sdk, project["id"])["local"]
    stroke = np.zeros((160, 240), dtype=np.uint8)
    stroke[40:120, 30:90] = 255  # a rough stroke over the tomato (20, 30, 100, 130)
    context = {
        "result": [
            {
                "id": "stroke1", "type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": "manual",
                "original_width": 240, "original_height": 160, "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(stroke), "brushlabels": ["tomato"]},
            }
        ]
    }  # fmt: skip
    response = label_studio.http.post(
        f"/api/ml/{project['backend']}/interactive-annotating", json={"task": task.id, "context": context}
    )
    assert response.status_code == 200, response.text
    (region,) = response.json()["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["tomato"]
    assert (region["original_width"], region["original_height"]) == (240, 160)
    assert region["id"] == "stroke1"  # Label Studio's acceptSuggestion then puts it in place of the rough region
    mask = decode_rle(region["value"]["rle"]).reshape(160, 240, 4)[:, :, 3] > 127
    assert mask.any()


def test_another_models_predictions_refined_into_a_new_version(label_studio, usam, images, tmp_path, redis_url):
    """Coarse brush predictions imported under a model version -> usam refine --project -> the same
    regions, refined, under V+uosam; a second run finds nothing left."""
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="coarse", label_config=project_config("semantic_brush.xml", LABELS)).id
    for name in ("local", "upload"):
        label_studio.upload(pid, images[name])
    tasks = sorted(t.id for t in sdk.tasks.list(project=pid))
    coarse = np.zeros((160, 240), dtype=np.uint8)
    coarse[20:140, 10:110] = 255  # a blob larger than any object
    region = {
        "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 240, "original_height": 160,
        "image_rotation": 0, "value": {"format": "rle", "rle": mask2rle(coarse), "brushlabels": ["tomato"]},
    }  # fmt: skip
    for task_id in tasks:
        sdk.predictions.create(task=task_id, result=[region], model_version="coarse-v1", score=0.5)
    env = {
        **{k: v for k, v in usam.env.items() if k != "USAM_WEBHOOK_SECRET"},
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
        "USAM_MODEL_DIR": str(tmp_path / "models"),
    }  # fmt: skip
    command = [sys.executable, "-m", "usam_backend.cli", "refine", "--project", str(pid), "--from-version",
               "coarse-v1", "--no-global"]  # fmt: skip
    run = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 task(s) have a coarse-v1 prediction, 2 lack coarse-v1+uosam" in run.stdout
    assert "refined 2 under coarse-v1+uosam" in run.stdout and "refining" in run.stderr
    for task_id in tasks:
        refined = [p for p in sdk.predictions.list(task=task_id) if p.model_version == "coarse-v1+uosam"]
        assert len(refined) == 1 and refined[0].result[0]["value"]["brushlabels"] == ["tomato"]
        assert (refined[0].result[0]["original_width"], refined[0].result[0]["original_height"]) == (240, 160)
    again = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 lack" in again.stdout

    # the same on RQ workers: queue, return, a worker does the work
    pid2 = sdk.projects.create(title="coarse rq", label_config=project_config("semantic_brush.xml", LABELS)).id
    label_studio.upload(pid2, images["local"])
    (task2,) = [t.id for t in sdk.tasks.list(project=pid2)]
    sdk.predictions.create(task=task2, result=[region], model_version="coarse-v1", score=0.5)
    queued = {**env, "REDIS_URL": redis_url, "USAM_QUEUE": "usam-refine"}
    command[command.index(str(pid))] = str(pid2)
    run = subprocess.run([*command, "--no-wait"], env={**os.environ, **queued}, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "queued 1 job(s)" in run.stdout and "on usam-refine" in run.stdout, run.stdout
    worker = run_worker(queued)
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "Job OK" in output, output
    assert [p.model_version for p in sdk.predictions.list(task=task2)].count("coarse-v1+uosam") == 1


def test_label_added_in_label_studio_reaches_setup(label_studio, usam, project):
    sdk = label_studio.sdk
    updated = project_config("interactive_brush.xml", {**LABELS, "cat": None})
    sdk.projects.update(id=project["id"], label_config=updated)
    events = usam.models / "events" / f"{project['id']}.jsonl"
    wait_until(lambda: "PROJECT_UPDATED" in events.read_text(), 10, "the PROJECT_UPDATED webhook")
    sdk.ml.get(id=project["backend"])  # Label Studio calls /setup with the new schema
    status = usam.health()["projects"][str(project["id"])]
    assert "cat" in status["labels"] and status["missing_labels"] == ["cat"]


def test_annotations_reach_the_webhook(label_studio, usam, project):
    sdk = label_studio.sdk
    task = tasks_by_kind(sdk, project["id"])["upload"]
    mask = np.zeros((160, 240), dtype=bool)
    mask[10:90, 10:120] = True
    from label_studio_sdk.converter.brush import mask2rle

    result = [
        {
            "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 240,
            "original_height": 160, "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                                              "brushlabels": ["Sky"]},
        }
    ]  # fmt: skip
    annotation = sdk.annotations.create(id=task.id, result=result)
    events = usam.models / "events" / f"{project['id']}.jsonl"
    wait_until(lambda: f'"id":{annotation.id}' in events.read_text(), 10, "the ANNOTATION_CREATED webhook")
    sdk.annotations.delete(id=annotation.id)
    wait_until(lambda: "ANNOTATIONS_DELETED" in events.read_text(), 10, "the ANNOTATIONS_DELETED webhook")
    text = events.read_text()
    assert "ANNOTATION_CREATED" in text and f'"task":{{"id":{task.id}' in text


def region_mask(region: dict) -> np.ndarray:
    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_annotations_teach_the_next_head(label_studio, usam, images):
    """Predict -> the annotator relabels the predicted region -> webhook -> feedback stored ->
    Start training -> a new head version -> the re-predicted task carries the correction."""
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="feedback", label_config=project_config("semantic_brush.xml", LABELS)).id
    label_studio.upload(pid, images["local"])
    backend = connect(label_studio, usam, pid)
    select_all = {"all": True, "excluded": []}
    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items=select_all)
    (task,) = sdk.tasks.list(project=pid)
    (first,) = sdk.predictions.list(task=task.id)
    assert first.result, "the test needs a predicted region to correct"
    region = first.result[0]
    (wrong,) = region["value"]["brushlabels"]
    right = "Sky" if wrong == "tomato" else "tomato"
    corrected = {**region, "value": {**region["value"], "brushlabels": [right]}}
    sdk.annotations.create(id=task.id, result=[corrected])  # Label Studio keeps the prediction's region id

    status = lambda: usam.health()["projects"][str(pid)]["feedback"]  # noqa: E731
    wait_until(lambda: status()["annotated_tasks"] == 1, 20, "the annotation in the feedback store")
    removed = len(first.result) - 1
    assert status()["regions"] == {"kept": 0, "removed": removed, "changed": 1, "added": 0}

    sdk.ml.train(id=backend)  # Start training -> START_TRAINING webhook -> a feedback job

    def feedback_job() -> dict | None:
        found = [
            j for j in usam.client.get("/jobs").json()["jobs"] if j["kind"] == "feedback" and j["project"] == str(pid)
        ]
        return found[0] if found and found[0]["status"] in ("finished", "failed") else None

    wait_until(lambda: feedback_job() is not None, 240, "the feedback training job")
    job = feedback_job()
    assert job["status"] == "finished", job
    assert job["result"]["feedback"]["annotated_tasks"] == 1
    assert job["result"]["feedback"]["instances"].get(right, 0) > 0
    new_version = job["result"]["version"]
    assert new_version != first.model_version
    assert sdk.ml.get(id=backend).model_version == new_version  # /setup serves the project's own head

    sdk.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items=select_all)
    (second,) = [p for p in sdk.predictions.list(task=task.id) if p.model_version == new_version]
    there = [r for r in second.result if iou(region_mask(r), region_mask(region)) >= 0.5]
    assert there, "the corrected region is predicted again"
    assert all(r["value"]["brushlabels"] == [right] for r in there), "it carries the annotator's label"
    serving = [p for p in usam.health()["projects"].values() if p.get("model_version") == new_version]
    assert len(serving) == 1  # the feedback head serves its own project only


def test_preannotate_a_project_with_two_rq_workers(label_studio, usam, images, redis_url, tmp_path):
    sdk = label_studio.sdk
    pid = sdk.projects.create(title="bulk", label_config=project_config("semantic_brush.xml", LABELS)).id
    for i in range(6):
        copy = tmp_path / f"bulk{i}.png"
        shutil.copy(images["local" if i % 2 else "upload"], copy)
        label_studio.upload(pid, copy)
    tasks = sorted(t.id for t in sdk.tasks.list(project=pid))
    version = model_version(Head.load(usam.models / "heads" / "head.pt"), "tiny")
    label_studio.http.post("/api/predictions/", json={"task": tasks[0], "result": [], "model_version": version})
    env = {
        **{k: v for k, v in usam.env.items() if k != "USAM_WEBHOOK_SECRET"},
        "REDIS_URL": redis_url, "USAM_QUEUE": "usam-bulk", "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "USAM_PREANNOTATE_CHUNK": "1",
    }  # fmt: skip
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [run_worker(env, burst=False, log=log) for log in logs]
    try:
        from redis import Redis
        from rq import Worker

        connection = Redis.from_url(redis_url)
        wait_until(lambda: len(Worker.all(connection=connection)) >= 2, 60, "two RQ workers")
        command = [sys.executable, "-m", "usam_backend.cli", "preannotate", "--project", str(pid), "--timeout", "240"]
        run = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "5 of 6 task(s) lack" in run.stdout and "predicted 5, already done 0, failed 0" in run.stdout
        assert "pre-annotating" in run.stderr  # the progress bar
        again = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 0 and "0 of 6 task(s) lack" in again.stdout  # resumable: nothing left to do
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait(timeout=30)
        for log in logs:
            log.close()
    for task_id in tasks:
        (stored,) = sdk.predictions.list(task=task_id)
        assert stored.model_version == version
    assert sum(len(sdk.predictions.list(task=t)[0].result) > 0 for t in tasks[1:]) == 5
    worked = [(tmp_path / f"worker{i}.log").read_text().count("Job OK") for i in range(2)]
    print(f"\njobs per worker: {worked}")
    assert sum(worked) == 5 and min(worked) >= 1, worked


def test_legacy_token_from_setup_and_its_refusal(label_studio, trained_head, images, tmp_path_factory):
    """Without LABEL_STUDIO_API_KEY, usam uses the token /setup sends; when legacy tokens are
    switched off in Label Studio, the failure names the fix."""
    models = tmp_path_factory.mktemp("legacy-models")
    trained_head.save(models / "heads" / "head.pt")
    env = {"USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_MODEL_DIR": str(models)}
    usam = UsamServer(env, models / "serve.log")
    try:
        sdk = label_studio.sdk
        created = sdk.projects.create(title="legacy", label_config=project_config("semantic_brush.xml", LABELS))
        label_studio.upload(created.id, images["upload"])
        sdk.ml.create(url=usam.url, project=created.id, title="usam legacy")
        select_all = {"all": True, "excluded": []}
        sdk.actions.create(id="retrieve_tasks_predictions", project=created.id, selected_items=select_all)
        (task,) = sdk.tasks.list(project=created.id)
        (stored,) = sdk.predictions.list(task=task.id)
        assert len(stored.result) > 0

        label_studio.allow_legacy_tokens(False)
        reply = usam.client.post(
            "/predict",
            json={"tasks": [{"id": task.id, "data": task.data}], "project": f"{created.id}.0"},
        )
        assert reply.json()["results"][0]["result"] == []
        reason = usam.health()["recent_failures"][-1]["reason"]
        assert "legacy token" in reason and "LABEL_STUDIO_API_KEY" in reason
    finally:
        usam.stop()
        label_studio.allow_legacy_tokens(True)  # the other end-to-end files share this Label Studio
        time.sleep(0.1)
