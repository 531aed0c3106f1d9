"""End to end against a real Label Studio 1.23.2: a detection project (``rectangles.xml``) and a
polygon project (``polygons.xml``) each get a head, predictions that Label Studio stores and returns
(equal to the backend's masks in the project's shape), and interactive answers in that shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from training import Head
from usam_backend.labelstudio.config import parse_label_config
from usam_backend.labelstudio.results import mask_results
from usam_backend.registry import model_version
from usam_backend.systems.usam import SemanticSegmenter

from conftest import scene
from helpers import UsamServer, project_config, wait_until

pytestmark = pytest.mark.labelstudio

LABELS = {"Sky": "sky", "tomato": None}
H, W = 160, 240


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shape-images") / "two.png"
    Image.fromarray(scene((H, W), [("tomato", (20, 30, 100, 130)), ("sky", (140, 30, 220, 130))], seed=31)).save(path)
    return path


@pytest.fixture(scope="module")
def usam(label_studio, trained_head, tmp_path_factory):
    models = tmp_path_factory.mktemp("shape-models")
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "64", "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("shape-cache")), "USAM_AUTO_TRAIN": "false",
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.personal_token(),
    }  # fmt: skip
    server = UsamServer(env, models / "serve.log")
    server.models = models  # type: ignore[attr-defined]
    yield server
    server.stop()


def make_project(label_studio, usam, template: str, image: Path) -> dict:
    sdk = label_studio.sdk
    config = project_config(template, LABELS)
    pid = sdk.projects.create(title=f"usam {template}", label_config=config).id
    label_studio.upload(pid, image)
    wait_until(lambda: len(list(sdk.tasks.list(project=pid))) == 1, 60, "1 task")
    backend = sdk.ml.create(url=usam.url, project=pid, title="usam", is_interactive=True)
    (task,) = sdk.tasks.list(project=pid)
    return {"id": pid, "config": config, "backend": int(backend.id), "task": task}


@pytest.mark.parametrize(
    ("template", "kind"), [("rectangles.xml", "rectanglelabels"), ("polygons.xml", "polygonlabels")]
)
def test_a_shape_project_gets_its_shapes_stored_and_interactive_answers(
    label_studio, usam, image, tiny_engine, template, kind
):
    sdk = label_studio.sdk
    project = make_project(label_studio, usam, template, image)
    head = Head.load(usam.models / "heads" / "head.pt")
    version = model_version(head, "tiny")
    assert sdk.ml.get(id=project["backend"]).model_version == version  # the head serves the project's labels

    sdk.actions.create(
        id="retrieve_tasks_predictions", project=project["id"], selected_items={"all": True, "excluded": []}
    )
    (stored,) = sdk.predictions.list(task=project["task"].id)
    assert stored.model_version == version
    assert LabelInterface(project["config"]).validate_prediction(
        {"result": stored.result, "score": stored.score, "model_version": version}
    )
    config = parse_label_config(project["config"])
    labels = {label.value: label for label in config.labels}
    segmenter = SemanticSegmenter(tiny_engine, head, points=64, score_threshold=0.5, nms_iou=0.5)
    expected = segmenter.segment(np.asarray(Image.open(image).convert("RGB")), classes={"sky", "tomato"})
    assert len(expected) > 0
    want = []
    for index, (mask, name) in enumerate(zip(expected.masks, expected.labels, strict=True)):
        label = labels[{"sky": "Sky", "tomato": "tomato"}[name]]
        want += [(r["type"], r["value"]) for r in mask_results(mask, label, 0.0, f"r{index}")]
    assert {r["type"] for r in stored.result} == {kind}
    assert [(r["type"], r["value"]) for r in stored.result] == want  # what Label Studio returns is what usam made

    tool = "tag" if kind == "rectanglelabels" else "box"  # a detection project's own boxes; the polygons' prompt
    context = {"result": [{
        "type": "rectanglelabels", "from_name": tool, "to_name": "image", "original_width": W, "original_height": H,
        "value": {"x": 5.0, "y": 12.0, "width": 40.0, "height": 80.0, "rectanglelabels": ["tomato"]},
    }]}  # fmt: skip
    response = label_studio.http.post(
        f"/api/ml/{project['backend']}/interactive-annotating", json={"task": project["task"].id, "context": context}
    )
    assert response.status_code == 200, response.text
    answer = response.json()["data"]["result"]
    assert answer and {r["type"] for r in answer} == {kind}
    assert all(r["value"][kind] == ["tomato"] for r in answer)
    click = {"result": [{
        "type": "keypointlabels", "from_name": "point", "to_name": "image", "is_positive": True,
        "original_width": W, "original_height": H, "value": {"x": 25.0, "y": 50.0, "keypointlabels": ["Sky"]},
    }]}  # fmt: skip
    response = label_studio.http.post(
        f"/api/ml/{project['backend']}/interactive-annotating", json={"task": project["task"].id, "context": click}
    )
    assert response.status_code == 200, response.text
    assert {r["type"] for r in response.json()["data"]["result"]} == {kind}
