"""Liveness under load: with 40 /predict calls in flight, /webhook and /health still answer within
Label Studio's patience, and predictions beyond the bounded queue are turned away with 503; the bound
is exactly ``USAM_MAX_PENDING_PREDICTIONS``."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
from PIL import Image

from usam_backend.core.settings import Settings
from usam_backend.server.app import create_app
from usam_backend.server.service import Backend, PredictRequest

from conftest import scene
from helpers import UsamServer, WebHost

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="tomato"/><Label value="sky"/></BrushLabels></View>"""


def test_control_routes_answer_while_40_predictions_are_in_flight(tmp_path, trained_head):
    for i in range(40):
        Image.fromarray(scene((384, 512), [("sky", (10 + i, 10, 300, 200))], seed=i)).save(tmp_path / f"{i}.png")
    images = WebHost(tmp_path)
    models = tmp_path / "models"
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "100", "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path / "cache"), "USAM_ALLOWED_HOSTS": "127.0.0.1", "USAM_AUTO_TRAIN": "false",
        "USAM_MAX_PENDING_PREDICTIONS": "8", "USAM_EMBEDDING_CACHE_SIZE": "0",
    }  # fmt: skip
    server = UsamServer(env, tmp_path / "serve.log")
    try:
        assert server.client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        predictions: list[httpx.Response] = []
        control: list[float] = []
        done = threading.Event()

        def predict(i: int) -> None:
            body = {"tasks": [{"id": i, "data": {"image": f"{images.url}/{i}.png"}}], "project": "1.1"}
            with httpx.Client(base_url=server.url, timeout=300) as client:
                predictions.append(client.post("/predict", json=body))

        def probe() -> None:
            event = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 1, "result": []}}
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not done.is_set():
                    for method, path, body in (("POST", "/webhook", event), ("GET", "/health", None)):
                        started = time.perf_counter()
                        response = client.request(method, path, json=body)
                        control.append(time.perf_counter() - started)
                        assert response.status_code == 200, response.text
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(40) as pool:
            list(pool.map(predict, range(40)))
        done.set()
        prober.join()
        served = [r for r in predictions if r.status_code == 200]
        refused = [r for r in predictions if r.status_code == 503]
        print(f"\n/predict: {len(served)} served, {len(refused)} refused with 503; /webhook and /health: "
              f"{len(control)} calls, slowest {max(control):.3f} s")  # fmt: skip
        assert len(served) + len(refused) == 40 and len(served) >= 8 and refused
        assert all(r.headers["Retry-After"] == "10" and "retry later" in r.json()["error"] for r in refused)
        assert len(control) >= 4 and max(control) < 1.0
        assert server.alive()
    finally:
        server.stop()
        images.stop()
        shutil.rmtree(Path(env["USAM_CACHE_DIR"]), ignore_errors=True)


def test_exactly_the_pending_limit_is_admitted_and_the_rest_get_503(tmp_path, monkeypatch):
    """USAM_MAX_PENDING_PREDICTIONS=3 and 5 calls whose work blocks until released: 3 are admitted,
    2 are refused with 503 and Retry-After while the 3 wait; once released, the 3 are answered and
    the freed places admit again."""
    limit, extra = 3, 2
    environ = {
        "USAM_MAX_PENDING_PREDICTIONS": str(limit), "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu",
        "USAM_MODEL_DIR": str(tmp_path / "models"), "USAM_CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip
    backend = Backend(Settings.from_env(environ))
    app = create_app(backend, loopback_only=True)
    started: list[int] = []
    release = threading.Event()

    def blocked(request: PredictRequest) -> list:
        started.append(int(request.tasks[0]["id"]))
        if not release.wait(60):
            raise TimeoutError("the test never released the predictions")
        return [[] for _ in request.tasks]

    monkeypatch.setattr(backend, "predict", blocked)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
        answered: list[httpx.Response] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://usam", timeout=60) as client:

            async def call(i: int) -> None:
                answered.append(await client.post("/predict", json={"tasks": [{"id": i, "data": {}}]}))

            async with anyio.create_task_group() as calls:
                try:
                    for i in range(limit + extra):
                        calls.start_soon(call, i)
                    with anyio.fail_after(20):  # the admitted block; the refused are answered meanwhile
                        while len(started) < limit or len(answered) < extra:
                            await anyio.sleep(0.01)
                    while_blocked = list(answered)
                finally:
                    release.set()
            after = await client.post("/predict", json={"tasks": [{"id": 99, "data": {}}]})
        return while_blocked, answered, after

    while_blocked, answered, after = anyio.run(scenario)
    assert len(started) == limit + 1  # the limit, then the call after the release
    assert [r.status_code for r in while_blocked] == [503] * extra
    for refused in while_blocked:
        assert refused.headers["Retry-After"] == "10" and "retry later" in refused.json()["error"]
    assert sorted(r.status_code for r in answered) == [200] * limit + [503] * extra
    assert after.status_code == 200 and started[-1] == 99
