"""Liveness under load: with 40 /predict calls in flight, /webhook and /health still answer within
Label Studio's patience, and predictions beyond the bounded queue are turned away with 503."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

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
