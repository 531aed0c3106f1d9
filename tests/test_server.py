"""``usam serve`` over real HTTP: the Label Studio protocol, predictions, prompts, auth, bad input; and
the app in process for the table of its routes."""

import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from training import Head
from usam_backend.registry import model_version
from usam_backend.server.app import create_app
from usam_backend.systems.usam import SemanticSegmenter

from conftest import scene
from helpers import UsamServer, WebHost, tiny_backend

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Sky" predicted_values="sky"/>
    <Label value="tomato"/>
    <Label value="cat"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="tomato"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Sky"/></RectangleLabels>
</View>"""
PROJECT = "7.1700000000"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    Image.fromarray(scene((160, 240), [("tomato", (20, 30, 100, 130)), ("sky", (140, 30, 220, 130))], 7)).save(
        root / "two.png"
    )
    Image.fromarray(scene((120, 120), [("sky", (10, 10, 90, 90))], 8)).save(root / "three.png")
    (root / "notes.png").write_text("this is not an image")
    host = WebHost(root)
    yield host
    host.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_head):
    folder = tmp_path_factory.mktemp("models")
    trained_head.save(folder / "heads" / "tiny-head.pt")
    return folder


def server_env(model_dir, tmp_path_factory, **extra):
    return {
        "USAM_SAM_TYPE": "tiny",
        "USAM_DEVICE": "cpu",
        "USAM_POINTS": "64",
        "USAM_MODEL_DIR": str(model_dir),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("server-cache")),
        "USAM_ALLOWED_HOSTS": "127.0.0.1",
        **extra,
    }


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = UsamServer(server_env(model_dir, tmp_path_factory), tmp_path_factory.mktemp("logs") / "serve.log")
    yield running
    running.stop()


def setup_project(server, config=CONFIG, project=PROJECT):
    return server.client.post("/setup", json={"project": project, "schema": config, "hostname": "http://127.0.0.1:1"})


def test_setup_answers_the_serving_heads_version(server, model_dir, trained_head):
    started = time.monotonic()
    response = setup_project(server)
    assert time.monotonic() - started < 3.0  # Label Studio's ML_TIMEOUT_SETUP
    assert response.status_code == 200
    assert response.json() == {"model_version": model_version(trained_head, "tiny")}
    assert server.client.get("/versions").json() == {"versions": [model_version(trained_head, "tiny")]}


def test_batch_prediction(server, images, tiny_engine, model_dir):
    setup_project(server)
    tasks = [
        {"id": 11, "data": {"image": f"{images.url}/two.png"}},
        {"id": 12, "data": {"image": f"{images.url}/missing.png"}},
        {"id": 13, "data": {"image": f"{images.url}/notes.png"}},
        {"id": 14, "data": {"image": f"{images.url}/two.png"}},
        {"id": 15, "data": {"picture": "no image field"}},
    ]
    response = server.client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)  # exactly one per task, in order

    head = Head.load(model_dir / "heads" / "tiny-head.pt")
    version = model_version(head, "tiny")
    assert {r["model_version"] for r in results} == {version}
    for failed in (results[1], results[2], results[4]):
        assert failed["result"] == [] and failed["score"] == 0.0
    reasons = " ".join(f["reason"] for f in server.health()["recent_failures"])
    assert "HTTP 404" in reasons and "not a readable image" in reasons and "no 'image' field" in reasons

    interface = LabelInterface(CONFIG)
    segmenter = SemanticSegmenter(tiny_engine, head, points=64, score_threshold=0.5, nms_iou=0.5)
    image = np.asarray(Image.open(images.root / "two.png").convert("RGB"))
    expected = segmenter.segment(image, classes={"sky", "tomato"})
    for result in (results[0], results[3]):
        assert interface.validate_prediction(result)
        regions = result["result"]
        assert len(regions) == len(expected) > 0
        labels = [r["value"]["brushlabels"][0] for r in regions]
        assert set(labels) <= {"Sky", "tomato"}  # never "cat": the head does not know it
        assert labels == [{"sky": "Sky", "tomato": "tomato"}[name] for name in expected.labels]
        for region, mask in zip(regions, expected.masks, strict=True):
            decoded = decode_rle(region["value"]["rle"]).reshape(160, 240, 4)[:, :, 3]
            assert np.array_equal(decoded > 0, mask)
            assert (region["original_width"], region["original_height"]) == (240, 160)
        assert result["score"] == pytest.approx(expected.confidence, abs=1e-5)  # decision confidence of the grid
        assert 0.0 <= result["score"] <= 1.0


def test_interactive_prompts_reuse_the_image_embedding(server, images):
    setup_project(server)
    task = {"id": 21, "data": {"image": f"{images.url}/three.png"}}

    def click(x, y, positive=True):
        context = {
            "result": [
                {
                    "type": "keypointlabels",
                    "from_name": "kp",
                    "to_name": "image",
                    "is_positive": positive,
                    "original_width": 120,
                    "original_height": 120,
                    "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["tomato"]},
                }
            ]
        }
        body = {"tasks": [task], "project": PROJECT, "params": {"context": context}}
        return server.client.post("/predict", json=body)

    before = server.health()["sam"]["encoder_passes"]
    first = click(40, 40)
    assert first.status_code == 200, first.text
    (prediction,) = first.json()["results"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "tag"
    assert region["value"]["brushlabels"] == ["tomato"]
    assert server.health()["sam"]["encoder_passes"] == before + 1
    assert click(60, 50, positive=False).status_code == 200
    assert server.health()["sam"]["encoder_passes"] == before + 1  # the second click reused the embedding

    box_context = {
        "result": [
            {
                "type": "rectanglelabels",
                "to_name": "image",
                "value": {"x": 10, "y": 10, "width": 50, "height": 60, "rectanglelabels": ["Sky"]},
            }
        ]
    }
    boxed = server.client.post(
        "/predict", json={"tasks": [task], "project": PROJECT, "params": {"context": box_context}}
    )
    assert boxed.json()["results"][0]["result"][0]["value"]["brushlabels"] == ["Sky"]


def test_labels_no_head_knows_get_empty_predictions_and_a_reason(server, images):
    config = CONFIG.replace('value="Sky" predicted_values="sky"', 'value="zebra"').replace('"tomato"', '"okapi"')
    config = config.replace('<Label value="cat"/>', "")
    version = setup_project(server, config, project="8.1").json()["model_version"]
    assert version == "usam-tiny-no-head-yet"
    tasks = [{"id": 1, "data": {"image": f"{images.url}/two.png"}}]
    results = server.client.post("/predict", json={"tasks": tasks, "project": "8.1"}).json()["results"]
    assert results == [{"result": [], "score": 0.0, "model_version": version}]
    status = server.health()["projects"]["8"]
    assert status["head"] is None and "no head" in status["why"]


def test_webhook_records_every_action_quickly(server, model_dir):
    setup_project(server)
    updated = CONFIG.replace('<Label value="cat"/>', '<Label value="cat"/><Label value="dog"/>')
    events = [
        {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 7},
            "task": {"id": 11},
            "annotation": {"id": 1, "result": []},
        },
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 7}, "annotations": [{"id": 1}]},
        {"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": [{"id": 30}]},
        {"action": "PROJECT_UPDATED", "project": {"id": 7, "label_config": updated}},
        {"action": "START_TRAINING", "project": {"id": 7, "title": "x"}},
        {"action": "SOMETHING_NEW", "project": {"id": 7}},
    ]
    for event in events:
        started = time.monotonic()
        response = server.client.post("/webhook", json=event)
        assert time.monotonic() - started < 1.0  # Label Studio's WEBHOOK_TIMEOUT
        assert response.status_code == 200 and response.json() == {"status": "ok", "action": event["action"]}
    lines = (model_dir / "events" / "7.jsonl").read_text().splitlines()
    recorded = [json.loads(line)["action"] for line in lines]
    assert recorded[-len(events) :] == [e["action"] for e in events]
    assert "dog" in server.health()["projects"]["7"]["labels"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/predict", b"{not json", 422, "not what usam expects"),
        ("POST", "/predict", {"project": PROJECT}, 422, "not what usam expects"),
        ("POST", "/predict", {"tasks": "nope"}, 422, "not what usam expects"),
        ("POST", "/predict", {"tasks": [{"id": 1, "data": {}}], "project": "999.1"}, 404, "unknown"),
        ("POST", "/predict", {"tasks": [], "project": "x.y"}, 404, "not a Label Studio project id"),
        ("POST", "/predict", {"tasks": [], "label_config": "<View>" + "x" * 10_000_000}, 422, "usam reads at most"),
        ("POST", "/setup", {"project": "1.1", "schema": "<View>" + " " * 10_000_000 + "</View>"}, 422, "at most"),
        (
            "POST",
            "/setup",
            {"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"},
            422,
            "BrushLabels",
        ),
        ("POST", "/setup", {"project": "1.1"}, 422, "not what usam expects"),
        ("POST", "/webhook", {"no": "action"}, 422, "not what usam expects"),
        (
            "POST",
            "/predict",
            {
                "tasks": [{"id": 1, "data": {}}],
                "label_config": CONFIG,
                "params": {
                    "context": {
                        "result": [
                            {"type": "keypointlabels", "to_name": "image", "value": {"keypointlabels": ["tomato"]}}
                        ]
                    }
                },
            },
            422,
            "numeric x, y",
        ),
        ("GET", "/predict", None, 405, "Method Not Allowed"),
        ("GET", "/nowhere", None, 404, "Not Found"),
    ],
)
def test_bad_requests_get_clear_json_errors(server, method, path, body, status, message):
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) or body is None else body
    response = server.client.request(
        method, path, content=content, json=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error + json.dumps(response.json().get("details"))
    assert "Traceback" not in response.text
    assert server.alive() and server.health()["status"] == "UP"


def test_openapi_document(server):
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/health", "/setup", "/predict", "/webhook", "/versions"} <= set(paths)


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    env = server_env(
        model_dir, tmp_path_factory, BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret", USAM_WEBHOOK_SECRET="hook-secret"
    )
    running = UsamServer(env, tmp_path_factory.mktemp("logs") / "guarded.log")
    yield running
    running.stop()


def test_basic_auth_guards_everything_but_the_webhook(guarded):
    anonymous = httpx.Client(base_url=guarded.url)
    wrong = httpx.Client(base_url=guarded.url, auth=("ann", "wrong"))
    for client in (anonymous, wrong):
        for method, path in (("GET", "/health"), ("POST", "/setup"), ("POST", "/predict"), ("GET", "/versions")):
            response = client.request(method, path, json={})
            assert response.status_code == 401 and "basic auth" in response.json()["error"]
    assert guarded.client.get("/health").status_code == 200
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3}}
    assert anonymous.post("/webhook", json=event).status_code == 401  # no secret header
    bad = anonymous.post("/webhook", json=event, headers={"X-Usam-Webhook-Secret": "nope"})
    assert bad.status_code == 401 and "X-Usam-Webhook-Secret" in bad.json()["error"]
    good = anonymous.post("/webhook", json=event, headers={"X-Usam-Webhook-Secret": "hook-secret"})
    assert good.status_code == 200
    # Start training arrives as an ML-backend call: basic auth, no webhook headers
    start = {"action": "START_TRAINING", "project": {"id": 3}}
    assert anonymous.post("/webhook", json=start).status_code == 401
    assert guarded.client.post("/webhook", json=start).status_code == 200


def test_every_route_but_ping_and_webhook_needs_basic_auth(tmp_path):
    """Every route the app registers, the API documentation included; /webhook has its own secret."""
    app = create_app(tiny_backend(tmp_path, basic_auth_user="ann", basic_auth_pass="s3cret"))
    client = TestClient(app)
    routes = [(method, route.path) for route in app.routes for method in sorted(getattr(route, "methods", {"GET"}))]
    checked = {path for method, path in routes if path not in ("/ping", "/webhook") and method != "HEAD"}
    assert {"/health", "/setup", "/predict", "/jobs", "/versions", "/openapi.json", "/docs", "/redoc"} <= checked
    for method, path in routes:
        if path in ("/ping", "/webhook") or method == "HEAD":
            continue
        assert "{" not in path, f"{path}: give the test a value for its parameters"
        for auth in (None, ("ann", "wrong")):
            refused = client.request(method, path, auth=auth)
            assert refused.status_code == 401 and "basic auth" in refused.json()["error"], (method, path, auth)
        assert client.request(method, path, auth=("ann", "s3cret")).status_code != 401, (method, path)
    assert client.get("/ping").status_code == 200
    assert client.get("/docs", auth=("ann", "s3cret")).text.count("/openapi.json") == 1  # the UI reads the schema
