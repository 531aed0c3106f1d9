"""The backend learns from annotations on its own, and hands unfinished batches to pre-annotation jobs."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from usam_backend.core.settings import Settings
from usam_backend.labelstudio.config import parse_label_config
from usam_backend.registry import model_version
from usam_backend.server.service import Backend, PredictRequest

from conftest import scene
from helpers import UsamServer, WebHost, wait_until

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Sky" predicted_values="sky"/><Label value="tomato"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    for i in range(3):
        shapes = [("tomato", (20 + 10 * i, 30, 100, 130)), ("sky", (140, 30, 220 - 10 * i, 130))]
        Image.fromarray(scene((160, 240), shapes, seed=40 + i)).save(root / f"t{i}.png")
    server = WebHost(root)
    yield server
    server.stop()


def brush(label: str, box: tuple[int, int, int, int]) -> dict:
    mask = np.zeros((160, 240), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return {
        "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": 240, "original_height": 160,
        "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]},
    }  # fmt: skip


def backend_settings(tmp_path, trained_head, class_dir, *, retrain_every: int) -> Settings:
    """Tiny SAM, the shared head on disk, class images from a folder, task images from loopback."""
    models = tmp_path / "models"
    trained_head.save(models / "heads" / "head.pt")
    return Settings(
        sam_type="tiny", device="cpu", points=64, model_dir=models, cache_dir=tmp_path / "cache",
        allowed_hosts=("127.0.0.1",), data_source="folder", data_dir=class_dir, retrain_every=retrain_every,
        train_epochs=10,
    )  # fmt: skip


def test_every_n_annotations_retrain_a_project_head(tmp_path, trained_head, class_dir, host):
    backend = Backend(backend_settings(tmp_path, trained_head, class_dir, retrain_every=2))
    shared = model_version(trained_head, "tiny")
    assert backend.setup("5.100", CONFIG, host.url, None, trust_hostname=True) == shared
    tasks = [{"id": i, "data": {"image": f"{host.url}/t{i}.png"}} for i in range(3)]
    predicted = backend.predict(PredictRequest(tasks=tasks, project="5.100"))
    assert all(p["model_version"] == shared for p in predicted)

    def annotate(task: dict, annotation_id: int) -> None:
        result = [brush("tomato", (20, 30, 100, 130)), brush("Sky", (140, 30, 220, 130))]
        backend.webhook({"action": "ANNOTATION_CREATED", "project": {"id": 5}, "task": task,
                         "annotation": {"id": annotation_id, "task": task["id"], "result": result}})  # fmt: skip

    annotate(tasks[0], 1)
    wait_until(lambda: backend.feedback.state("5").annotations == 1, 10, "the first annotation")
    assert not [j for j in backend.runner.jobs() if j["kind"] == "feedback"]  # one is not enough
    annotate(tasks[1], 2)
    wait_until(lambda: any(j["kind"] == "feedback" for j in backend.runner.jobs()), 10, "a feedback job")
    backend.runner.wait(300)  # type: ignore[attr-defined]
    (job,) = [j for j in backend.runner.jobs() if j["kind"] == "feedback"]
    assert job["status"] == "finished", job
    assert job["trigger"] == "2 new annotations" and job["result"]["feedback"]["annotated_tasks"] == 2
    assert backend.feedback.state("5").since_training == 0

    version = job["result"]["version"]
    assert version != shared and backend.setup("5.100", CONFIG, host.url, None, trust_hostname=True) == version
    assert (
        backend.setup("6.100", CONFIG, host.url, None, trust_hostname=True) == shared
    )  # another project keeps the shared head
    again = backend.predict(PredictRequest(tasks=tasks[2:], project="5.100"))
    assert again[0]["model_version"] == version
    choice = backend.registry.choose(parse_label_config(CONFIG).labels, "5")
    assert choice is not None and choice.version == version
    assert choice.head.info["feedback"]["instances"]["_background"] > 0


def test_a_batch_that_runs_out_of_time_hands_the_rest_off(tmp_path, trained_head, host):
    models = tmp_path / "models"
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path / "cache"), "USAM_ALLOWED_HOSTS": "127.0.0.1", "USAM_PREDICT_BUDGET": "0.01",
        "USAM_PREANNOTATE_CHUNK": "1",
    }  # fmt: skip
    server = UsamServer(env, tmp_path / "serve.log")
    try:
        setup = {"project": "9.1", "schema": CONFIG, "hostname": "http://127.0.0.1:1", "access_token": "t" * 40}
        assert server.client.post("/setup", json=setup).status_code == 200
        tasks = [{"id": 20 + i, "data": {"image": f"{host.url}/t{i}.png"}} for i in range(3)]
        response = server.client.post("/predict", json={"tasks": tasks, "project": "9.1"})
        assert response.status_code == 200
        first, *rest = response.json()["results"]
        assert first["model_version"] == model_version(trained_head, "tiny") and first["result"]
        assert rest == [[], []]  # one element per task: no prediction yet for the two handed off

        def handed_off() -> list[dict]:
            jobs = [j for j in server.client.get("/jobs").json()["jobs"] if j["kind"] == "preannotate"]
            return jobs if len(jobs) == 2 and all(j["status"] == "failed" for j in jobs) else []

        wait_until(lambda: bool(handed_off()), 60, "two failed pre-annotation jobs")
        errors = [j["error"] for j in handed_off()]
        assert all("Label Studio at http://127.0.0.1:1 is unreachable" in e for e in errors), (
            errors
        )  # Label Studio is down
        assert "left for pre-annotation jobs" in server.log()
    finally:
        server.stop()


def point_mask(engine, image: np.ndarray, index: int) -> np.ndarray:
    """The mask SAM gives grid point ``index`` of ``image`` (its best-IoU one of three), as at inference."""
    import torch

    embedding = engine.embed(image)
    grid = engine.grid_points(embedding.original_size, 64)
    chunk = next(engine.decode(embedding, grid[index : index + 1]))
    logits = engine.low_res_logits(chunk, torch.arange(1))
    best = int(chunk.decoded.iou_predictions[0].argmax())
    return engine.upscale(logits[:, best], embedding)[0]


def test_a_label_without_class_images_is_learned_from_annotations(tmp_path, trained_head, class_dir, host,
                                                                     tiny_engine):  # fmt: skip
    config = CONFIG.replace("</BrushLabels>", '<Label value="grass"/></BrushLabels>')  # no class folder for grass
    backend = Backend(backend_settings(tmp_path, trained_head, class_dir, retrain_every=0))
    for pid in ("5", "6"):
        backend.setup(f"{pid}.1", config, host.url, None, trust_hostname=True)
    image = np.asarray(Image.open(host.root / "t0.png").convert("RGB"))
    grass = point_mask(tiny_engine, image, 27)
    assert grass.any()
    for pid, result in (("5", [{**brush("grass", (0, 0, 1, 1)), "value": {"format": "rle", "brushlabels": ["grass"],
                                 "rle": mask2rle(grass.astype(np.uint8) * 255)}}]),
                        ("6", [brush("tomato", (20, 30, 100, 130))])):  # fmt: skip
        task = {"id": 1, "data": {"image": f"{host.url}/t0.png"}}
        backend.webhook({"action": "ANNOTATION_CREATED", "project": {"id": int(pid)}, "task": task,
                         "annotation": {"id": 1, "task": 1, "result": result}})  # fmt: skip
        backend.webhook({"action": "START_TRAINING", "project": {"id": int(pid), "label_config": config}})
    wait_until(lambda: len([j for j in backend.runner.jobs() if j["kind"] == "feedback"]) == 2, 20, "two jobs")
    backend.runner.wait(300)  # type: ignore[attr-defined]
    jobs = {j["project"]: j for j in backend.runner.jobs() if j["kind"] == "feedback"}
    assert jobs["5"]["status"] == "finished", jobs["5"]
    assert jobs["5"]["result"]["feedback"]["instances"]["grass"] > 0
    choice = backend.registry.choose(parse_label_config(config).labels, "5")
    assert choice is not None and not choice.missing  # grass is served now, for this project
    assert "no folder for label 'grass'" in choice.head.info["provenance"]["classes"]["grass"]["no_class_images"]
    assert jobs["6"]["status"] == "failed"
    assert "no class images and no annotated region for 'grass'" in jobs["6"]["error"]
