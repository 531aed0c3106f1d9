"""Training on RQ workers through a real Redis: label added -> job -> head -> model_version -> labels
in predictions; and the faults: a killed worker, Redis gone, a failing job."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq.job import Job

from usam_backend.jobs import runners

from conftest import scene, write_class_folders
from helpers import UsamServer, WebHost, free_port, run_worker, wait_until

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
{labels}</BrushLabels></View>"""


def config_for(*labels: str) -> str:
    return CONFIG.format(labels="".join(f'<Label value="{label}"/>' for label in labels))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("data"), per_class=4, size=48, names=("tomato", "sky", "grass"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    Image.fromarray(scene((96, 96), [("grass", (4, 4, 92, 92))], seed=3)).save(root / "grass.png")
    host = WebHost(root)
    yield host
    host.stop()


def base_env(tmp_path_factory, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "USAM_SAM_TYPE": "tiny",
        "USAM_DEVICE": "cpu",
        "USAM_POINTS": "16",
        "USAM_MODEL_DIR": str(tmp_path_factory.mktemp("models")),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "USAM_TRAIN_EPOCHS": "5",
        "USAM_IMAGES_PER_CLASS": "3",
        "USAM_ALLOWED_HOSTS": "127.0.0.1",
        "REDIS_URL": redis_url,
        **extra,
    }


def burst(env: dict[str, str]) -> str:
    worker = run_worker(env)
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, output
    return output


def jobs(server: UsamServer) -> list[dict]:
    return list(server.client.get("/jobs").json()["jobs"])


def wait_for_job(server: UsamServer, labels: list[str], status: str, timeout: float = 30) -> dict:
    found: dict = {}

    def check() -> bool:
        for job in jobs(server):
            if sorted(job["labels"]) == sorted(labels) and job["status"] == status:
                found.update(job)
                return True
        return False

    wait_until(check, timeout, f"a {status} job for {labels}")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url, data):
    env = base_env(
        tmp_path_factory, redis_url, USAM_DATA_SOURCE="folder", USAM_DATA_DIR=str(data), USAM_TRAIN_EPOCHS="30",
        USAM_SCORE_THRESHOLD="0.34",  # just over chance for three classes: tiny SAM is random, the head is small
    )  # fmt: skip
    running = UsamServer(env, tmp_path_factory.mktemp("logs") / "serve.log")
    running.env = env  # type: ignore[attr-defined]
    yield running
    running.stop()


def setup(server: UsamServer, config: str) -> str:
    response = server.client.post("/setup", json={"project": "9.1", "schema": config})
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def test_label_added_trains_a_new_head_on_a_worker(server, images):
    assert setup(server, config_for("tomato", "sky")) == "usam-tiny-no-head-yet"
    wait_for_job(server, ["sky", "tomato"], "queued")
    assert server.client.get("/jobs").json()["runner"] == "rq"
    burst(server.env)
    finished = wait_for_job(server, ["sky", "tomato"], "finished")
    first = setup(server, config_for("tomato", "sky"))
    assert first == finished["result"]["version"]
    assert finished["progress"]["stage"] == "publishing"

    updated = config_for("tomato", "sky", "grass")  # a label added in Label Studio
    event = {"action": "PROJECT_UPDATED", "project": {"id": 9, "label_config": updated}}
    assert server.client.post("/webhook", json=event).status_code == 200
    wait_for_job(server, ["grass", "sky", "tomato"], "queued")
    assert setup(server, updated) == first  # the previous head serves until the new one is published
    for _ in range(3):  # however many triggers arrive, one job per label set
        setup(server, updated)
    assert len([j for j in jobs(server) if len(j["labels"]) == 3]) == 1
    burst(server.env)
    wait_for_job(server, ["grass", "sky", "tomato"], "finished")
    second = setup(server, updated)
    assert second not in (first, "usam-tiny-no-head-yet")

    body = {"tasks": [{"id": 1, "data": {"image": f"{images.url}/grass.png"}}], "project": "9.1"}
    (prediction,) = server.client.post("/predict", json=body).json()["results"]
    assert prediction["model_version"] == second
    assert "grass" in {region["value"]["brushlabels"][0] for region in prediction["result"]}


def test_a_failing_job_reports_why_and_the_previous_head_keeps_serving(server):
    before = setup(server, config_for("tomato", "sky"))
    assert setup(server, config_for("tomato", "sky", "zebra")) == before  # no data folder for zebra
    wait_for_job(server, ["sky", "tomato", "zebra"], "queued")
    burst(server.env)
    failed = wait_for_job(server, ["sky", "tomato", "zebra"], "failed")
    assert "no folder for label 'zebra'" in failed["error"]
    assert setup(server, config_for("tomato", "sky", "zebra")) == before


def test_a_killed_worker_leaves_no_head_and_the_rerun_resumes(tmp_path_factory, redis_url, tiny_sd_model):
    env = base_env(
        tmp_path_factory, redis_url, USAM_DATA_SOURCE="synthetic", USAM_SD_MODEL=str(tiny_sd_model),
        USAM_SD_STEPS="2", USAM_SD_SIZE="64", USAM_SD_BATCH="4", USAM_IMAGES_PER_CLASS="12", USAM_POINTS="64",
        USAM_QUEUE="usam-kill-test",
    )  # fmt: skip
    server = UsamServer(env, tmp_path_factory.mktemp("logs") / "kill.log")
    try:
        setup(server, config_for("tomato", "sky"))
        job = wait_for_job(server, ["sky", "tomato"], "queued")
        log = (tmp_path_factory.mktemp("logs") / "worker.log").open("w")
        worker = run_worker(env, burst=False, log=log)

        def half_way() -> bool:
            return any(j["progress"].get("stage") == "embeddings" and j["progress"]["done"] >= 4 for j in jobs(server))

        wait_until(half_way, 240, "the job to be half-way through its embeddings")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        heads = Path(env["USAM_MODEL_DIR"]) / "heads"
        assert not list(heads.glob("*.pt")) if heads.exists() else True  # nothing published, nothing half-written
        assert server.client.get("/versions").json() == {"versions": []}
        bags = sorted((Path(env["USAM_CACHE_DIR"]) / "bags").rglob("*.npy"))
        assert 4 <= len(bags) < 24
        stamps = {p: p.stat().st_mtime_ns for p in bags}
        manifests = sorted((Path(env["USAM_CACHE_DIR"]) / "classes").rglob("manifest.json"))
        generated = {p: p.stat().st_mtime_ns for p in manifests}

        _age_heartbeat(redis_url, job["id"])  # as if the worker had been silent for minutes
        (stale,) = [j for j in jobs(server) if j["id"] == job["id"]]
        assert stale["status"] == "stale" and "submit again" in stale["error"]
        setup(server, config_for("tomato", "sky"))  # the next trigger queues it again
        wait_for_job(server, ["sky", "tomato"], "queued")
        burst(env)
        done = wait_for_job(server, ["sky", "tomato"], "finished")
        assert setup(server, config_for("tomato", "sky")) == done["result"]["version"]
        assert all(p.stat().st_mtime_ns == stamps[p] for p in bags)  # embeddings from before were reused
        assert all(p.stat().st_mtime_ns == generated[p] for p in manifests)  # no image generated again
        assert len(list((Path(env["USAM_CACHE_DIR"]) / "bags").rglob("*.npy"))) == 24
    finally:
        server.stop()


def _age_heartbeat(redis_url: str, job_id: str) -> None:
    job = Job.fetch(job_id, connection=Redis.from_url(redis_url))
    job.meta["heartbeat"] = time.time() - 3600
    job.save_meta()


def test_redis_unreachable_setup_and_predict_still_answer(tmp_path_factory, trained_head, images):
    env = base_env(tmp_path_factory, f"redis://127.0.0.1:{free_port()}/0", USAM_POINTS="64")
    trained_head.save(Path(env["USAM_MODEL_DIR"]) / "heads" / "head.pt")
    server = UsamServer(env, tmp_path_factory.mktemp("logs") / "no-redis.log")
    try:
        for _ in range(3):
            started = time.monotonic()
            version = setup(server, config_for("tomato", "sky", "grass"))  # grass is missing: it would train
            assert time.monotonic() - started < 3.0
            assert version.startswith("usam-tiny-") and "no-head" not in version
        body = {"tasks": [{"id": 1, "data": {"image": f"{images.url}/grass.png"}}], "project": "9.1"}
        response = server.client.post("/predict", json=body)
        assert response.status_code == 200 and response.json()["results"][0]["model_version"] == version
        wait_until(lambda: "unreachable" in server.health()["training"].get("fault", ""), 20, "the fault in /health")
        assert "unreachable" in server.client.get("/jobs").json()["fault"]
        started = time.monotonic()
        event = {"action": "START_TRAINING", "project": {"id": 9, "label_config": config_for("tomato", "sky")}}
        assert server.client.post("/webhook", json=event).status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        server.stop()


def test_a_worker_with_other_sam_fails_the_job_naming_both(tmp_path_factory, redis_url, data):
    server_env = base_env(
        tmp_path_factory, redis_url, USAM_DATA_SOURCE="folder", USAM_DATA_DIR=str(data), USAM_QUEUE="usam-mismatch"
    )
    worker_env = {**server_env, "USAM_SAM_TYPE": "vit_b", "USAM_POINTS": "64"}  # configured differently
    server = UsamServer(server_env, tmp_path_factory.mktemp("logs") / "mismatch.log")
    try:
        setup(server, config_for("tomato", "sky"))
        queued = wait_for_job(server, ["sky", "tomato"], "queued")
        assert queued["kind"] == "labels"
        burst(worker_env)
        failed = wait_for_job(server, ["sky", "tomato"], "failed")
        print(f"\n/jobs shows: {failed['status']}: {failed['error']}")
        assert "RecipeMismatch" in failed["error"]
        assert "SAM tiny (tiny-random)" in failed["error"] and "this worker runs SAM vit_b" in failed["error"]
        (in_health,) = [j for j in server.health()["training"]["jobs"] if j["id"] == failed["id"]]
        assert in_health["error"] == failed["error"]
        heads = Path(server_env["USAM_MODEL_DIR"]) / "heads"
        assert not heads.exists() or not list(heads.glob("*.pt"))  # nothing the server cannot use
    finally:
        server.stop()


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server of this test's own, keeping its data in ``folder`` (``dump.rdb``) across restarts."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed here; `make test` installs it")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_until(lambda: bool(Redis(port=port).ping()), 20, "redis-server")
    return process


def test_the_heartbeat_outlives_a_redis_outage(tmp_path, monkeypatch, caplog):
    """Redis goes away for half a second while a job runs: the job neither fails nor is taken for
    stale afterwards, and the outage is logged once, not at every beat."""
    port = free_port()
    server = start_redis(port, tmp_path)
    connection = Redis(port=port, retry=Retry(NoBackoff(), 0))  # fail at once, as when the client's retries ran out
    job = Job.create(print, id="heartbeat", connection=connection)
    job.save()
    monkeypatch.setattr(runners, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(runners, "get_current_job", lambda: job)
    caplog.set_level(logging.INFO, logger="usam.runner")
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = runners.rq_entry("tests_job_helpers.slow_job", {"seconds": 3})
        except Exception as exc:
            outcome["error"] = exc

    running = threading.Thread(target=work)
    running.start()
    try:
        wait_until(lambda: "heartbeat" in Job.fetch("heartbeat", connection=Redis(port=port)).meta, 5, "a heartbeat")
        Redis(port=port).save()  # the restarted server loads the job from dump.rdb
        server.terminate()
        server.wait(timeout=10)
        time.sleep(0.5)  # some ten beats and five progress reports fail
        server = start_redis(port, tmp_path)
        back = time.time()

        def beating() -> bool:
            return float(Job.fetch("heartbeat", connection=Redis(port=port)).meta["heartbeat"]) > back

        wait_until(beating, 5, "a heartbeat after Redis came back", interval=0.05)
        assert any(t.name == "usam-heartbeat" and t.is_alive() for t in threading.enumerate())
        running.join(timeout=10)
        assert outcome == {"result": {"slept": 3}}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot save" in warnings[0], warnings
        assert any("Redis answers again" in r.getMessage() for r in caplog.records)
    finally:
        running.join(timeout=10)
        server.terminate()
        server.wait(timeout=10)
