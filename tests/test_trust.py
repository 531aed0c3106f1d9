"""The trust boundary, tried as an attacker would: credentials go only where the operator pointed
them, nothing a caller sends makes usam connect to internal addresses, webhooks need the secret."""

from __future__ import annotations

import base64
import http.server
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from usam_backend.core.fetch import FetchLimits, GuardedFetcher, ImageFetchError
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.config import LabelConfigError, parse_label_config
from usam_backend.labelstudio.media import fetcher_for
from usam_backend.server.app import create_app

from conftest import scene
from helpers import UsamServer, WebHost, reply, tiny_backend

API_KEY = "k" * 40
SETUP_TOKEN = "s" * 40
CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="tomato"/><Label value="sky"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_head):
    models = tmp_path_factory.mktemp("trust-models")
    trained_head.save(models / "heads" / "head.pt")
    return models


def web_root(tmp_path_factory) -> WebHost:
    root = tmp_path_factory.mktemp("www")
    (root / "data" / "upload" / "1").mkdir(parents=True)
    Image.fromarray(scene((64, 64), [("sky", (4, 4, 60, 60))])).save(root / "data" / "upload" / "1" / "a.png")
    return WebHost(root)


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    host = web_root(tmp_path_factory)
    yield host
    host.stop()


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Stands in for the operator's Label Studio (only its /data/upload files matter here)."""
    host = web_root(tmp_path_factory)
    yield host
    host.stop()


def env(tmp_path_factory, **extra: str) -> dict[str, str]:
    return {
        "USAM_SAM_TYPE": "tiny",
        "USAM_DEVICE": "cpu",
        "USAM_POINTS": "64",
        "USAM_MODEL_DIR": str(tmp_path_factory.mktemp("models-copy")),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "USAM_AUTO_TRAIN": "false",
        "LABEL_STUDIO_API_KEY": API_KEY,
        **extra,
    }


def start(model_dir, tmp_path_factory, *, host: str, **extra: str) -> UsamServer:
    """A server with its own model folder holding the trained head."""
    settings = env(tmp_path_factory, **extra)
    shutil.copytree(model_dir / "heads", Path(settings["USAM_MODEL_DIR"]) / "heads")
    return UsamServer(settings, tmp_path_factory.mktemp("logs") / "serve.log", host=host)


def predict_upload(server: UsamServer, project: str = "1.1") -> dict:
    body = {"tasks": [{"id": 7, "data": {"image": "/data/upload/1/a.png"}}], "project": project}
    response = server.client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json()["results"][0])


def authorizations(host: WebHost) -> list[str]:
    return [headers.get("Authorization", "") for _, headers in host.requests]


def test_an_unauthenticated_caller_gets_no_key_and_no_connection(model_dir, tmp_path_factory, attacker):
    """usam listens beyond loopback without authentication (make serve's defaults)."""
    server = start(model_dir, tmp_path_factory, host="0.0.0.0", USAM_WEBHOOK_SECRET="hook")
    try:
        before = len(attacker.requests)
        for project in ("1.1", "1.1", "2.1"):  # a new project, the same again, another
            setup = {"project": project, "schema": CONFIG, "hostname": attacker.url}
            assert server.client.post("/setup", json=setup).status_code == 200
        assert predict_upload(server)["result"] == []
        assert predict_upload(server, "2.1")["result"] == []
        assert attacker.requests[before:] == []  # not one connection, so no key either
        health = server.health()
        assert "set LABEL_STUDIO_URL" in health["recent_failures"][-1]["reason"]
        assert any("without authentication" in w for w in health["warnings"])
        assert "without authentication" in server.log()

        metadata = {"project": "3.1", "schema": CONFIG, "hostname": "http://169.254.169.254"}
        assert server.client.post("/setup", json=metadata).status_code == 200
        assert predict_upload(server, "3.1")["result"] == []
        assert "set LABEL_STUDIO_URL" in server.health()["recent_failures"][-1]["reason"]

        for action in ("ANNOTATION_CREATED", "START_TRAINING", "PROJECT_UPDATED"):
            event = {"action": action, "project": {"id": 1, "label_config": CONFIG}, "annotation": {"id": 1}}
            assert server.client.post("/webhook", json=event).status_code == 401, action
        events = server.client.get("/health").json()["projects"]["1"]["feedback"]
        assert events["annotated_tasks"] == 0
    finally:
        server.stop()


def test_on_loopback_the_setup_hostname_gets_only_its_own_token(model_dir, tmp_path_factory, label_studio):
    server = start(model_dir, tmp_path_factory, host="127.0.0.1")
    try:
        before = len(label_studio.requests)
        setup = {"project": "1.1", "schema": CONFIG, "hostname": label_studio.url, "access_token": SETUP_TOKEN}
        assert server.client.post("/setup", json=setup).status_code == 200
        assert predict_upload(server)["model_version"].startswith("usam-tiny-")
        sent = authorizations(label_studio)[before:]
        assert sent and set(sent) == {f"Token {SETUP_TOKEN}"}  # never LABEL_STUDIO_API_KEY
        assert server.health()["warnings"] == []

        metadata = {"project": "3.1", "schema": CONFIG, "hostname": "http://169.254.169.254"}
        assert server.client.post("/setup", json=metadata).status_code == 200
        assert predict_upload(server, "3.1")["result"] == []
        assert "internal address 169.254.169.254" in server.health()["recent_failures"][-1]["reason"]
    finally:
        server.stop()


def test_the_key_goes_to_label_studio_url_only_and_webhooks_need_credentials(
    model_dir, tmp_path_factory, label_studio, attacker
):
    server = start(
        model_dir, tmp_path_factory, host="0.0.0.0", LABEL_STUDIO_URL=label_studio.url, BASIC_AUTH_USER="ann",
        BASIC_AUTH_PASS="pw", USAM_WEBHOOK_SECRET="hook",
    )  # fmt: skip
    try:
        before_ls, before_attacker = len(label_studio.requests), len(attacker.requests)
        setup = {"project": "1.1", "schema": CONFIG, "hostname": attacker.url, "access_token": SETUP_TOKEN}
        assert server.client.post("/setup", json=setup).status_code == 200
        assert predict_upload(server)["model_version"].startswith("usam-tiny-")
        assert set(authorizations(label_studio)[before_ls:]) == {f"Token {API_KEY}"}
        assert attacker.requests[before_attacker:] == []
        assert server.health()["warnings"] == []

        anonymous = httpx.Client(base_url=server.url, timeout=30)
        assert anonymous.get("/ping").json() == {"status": "UP"}  # the container's health check
        assert anonymous.get("/health").status_code == 401
        event = {"action": "START_TRAINING", "project": {"id": 1, "label_config": CONFIG}}
        assert anonymous.post("/webhook", json=event).status_code == 401
        created = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 5, "task": 7}}
        assert anonymous.post("/webhook", json=created).status_code == 401
        secret = {"X-Usam-Webhook-Secret": "hook"}
        assert anonymous.post("/webhook", json=created, headers=secret).status_code == 200
        assert server.client.post("/webhook", json=event).status_code == 200  # Start training: basic auth
        wrong = anonymous.post("/webhook", json=created, headers={"X-Usam-Webhook-Secret": "nope"})
        assert wrong.status_code == 401
    finally:
        server.stop()


def test_the_connection_goes_to_the_address_that_was_checked(tmp_path, monkeypatch):
    """DNS rebinding: the name resolves to an allowed address for the check, then to the metadata
    endpoint. usam resolves once and connects to the checked address."""
    (tmp_path / "a.png").write_bytes(b"image bytes")
    host = WebHost(tmp_path)
    port = host.server.server_port
    answers = iter(["127.0.0.1", "169.254.169.254", "169.254.169.254"])
    real = socket.getaddrinfo

    def rebinding(name, *args, **kwargs):
        if name == "images.test":
            address = next(answers)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with httpx.Client() as client:
            fetcher = GuardedFetcher(FetchLimits(1000, 5.0, ("images.test",)), client)
            assert fetcher.fetch_public(f"http://images.test:{port}/a.png") == b"image bytes"
            assert host.requests[-1][1]["Host"] == f"images.test:{port}"  # the name still travels
            with pytest.raises(ImageFetchError, match=r"internal address 169\.254\.169\.254"):
                fetcher.fetch_public(f"http://images.test:{port}/a.png")  # the next check sees the new answer
    finally:
        host.stop()


def test_the_rest_client_refuses_a_setup_hostname_at_a_metadata_address():
    from usam_backend.core.settings import Settings
    from usam_backend.labelstudio.client import LabelStudioApi, LabelStudioApiError
    from usam_backend.labelstudio.projects import ProjectRecord

    record = ProjectRecord("1", CONFIG, "http://169.254.169.254", SETUP_TOKEN, hostname_trusted=True)
    with httpx.Client() as client, pytest.raises(LabelStudioApiError, match="internal address"):
        LabelStudioApi.for_project(Settings(), record, client)
    named = LabelStudioApi.for_project(Settings(label_studio_url="http://127.0.0.1:1"), record, httpx.Client())
    assert named.url == "http://127.0.0.1:1"  # the operator's URL, whatever its address


def test_failures_name_no_credentials_from_task_urls(model_dir, tmp_path_factory, attacker):
    """Presigned signatures and ``user:pass@`` in task URLs stay out of /health and the log."""
    server = start(model_dir, tmp_path_factory, host="127.0.0.1", USAM_ALLOWED_HOSTS="127.0.0.1")
    try:
        port = attacker.server.server_port
        secrets = "?X-Amz-Signature=hunter2&X-Amz-Credential=AKIA"
        images = {
            1: f"http://ann:pw-hunter2@127.0.0.1:{port}/gone.png{secrets}",  # allowed host: HTTP 404
            2: f"http://ann:pw-hunter2@localhost:{port}/a.png{secrets}",  # not allowed: refused
        }
        assert server.client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        body = {"tasks": [{"id": i, "data": {"image": url}} for i, url in images.items()], "project": "1.1"}
        response = server.client.post("/predict", json=body)
        assert response.status_code == 200 and [p["result"] for p in response.json()["results"]] == [[], []]

        reasons = {f["task"]: f["reason"] for f in server.health()["recent_failures"]}
        assert f"http://127.0.0.1:{port}/gone.png?… answered HTTP 404" in reasons[1]
        assert f"refusing to fetch http://localhost:{port}/a.png?…" in reasons[2]
        for shown in (str(reasons), server.log()):
            assert "hunter2" not in shown and "AKIA" not in shown and "ann:" not in shown
    finally:
        server.stop()


@pytest.mark.parametrize(
    "doctype",
    [
        '<!DOCTYPE View [<!ENTITY label "tomato">]>',  # the SDK's parser would expand it
        '<!DOCTYPE View [<!ENTITY a "tomato"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>',  # entities in entities
        '<!DOCTYPE View [<!ENTITY label SYSTEM "file:///etc/hostname">]>',  # an external one
        "<!DOCTYPE View>",  # a DTD alone, no entity: still refused
    ],
)
def test_a_label_config_with_a_dtd_or_entities_is_refused(doctype):
    value = "tomato" if doctype == "<!DOCTYPE View>" else "&label;" if "label" in doctype else "&b;"
    xml = (
        f'{doctype}<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image"><Label value="{value}"/></BrushLabels></View>'
    )
    with pytest.raises(LabelConfigError, match="declares a DTD or entities"):
        parse_label_config(xml)


CDN_ADDRESS = "93.184.216.34"  # a public address; the requests to it never leave this process


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene((64, 64), [("sky", (4, 4, 60, 60))])).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_basic_auth_goes_only_to_allow_listed_hosts(tmp_path, model_dir, monkeypatch):
    """One /predict with ``params.login``/``password`` and three images: on an allow-listed host (it
    gets the basic auth), in Label Studio (its token only), and in cloud storage presigned by Label
    Studio, which redirects to a public host not in USAM_ALLOWED_HOSTS (nothing)."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.png").write_bytes(png_bytes())
    images = WebHost(tmp_path / "www")
    cdn_url = "http://cdn.example.com/shots/cloud.png?X-Amz-Signature=abc"
    ls_root = tmp_path / "label-studio"
    (ls_root / "data" / "upload" / "1").mkdir(parents=True)
    (ls_root / "data" / "upload" / "1" / "a.png").write_bytes(png_bytes())
    label_studio = WebHost(ls_root, {"/tasks/3/presign/": reply(302, headers={"Location": cdn_url})})
    cdn_requests: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        cdn_requests.append(request)
        return httpx.Response(200, content=png_bytes(), headers={"Content-Type": "image/png"})

    real_getaddrinfo = socket.getaddrinfo

    def resolve(name, port, *args, **kwargs):
        if name == "cdn.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (CDN_ADDRESS, port))]
        return real_getaddrinfo(name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    try:
        backend = tiny_backend(tmp_path, label_studio_url=label_studio.url, label_studio_api_key=API_KEY)
        shutil.copytree(model_dir / "heads", tmp_path / "models" / "heads")
        backend.http = httpx.Client(follow_redirects=False, mounts={f"all://{CDN_ADDRESS}": httpx.MockTransport(cdn)})
        client = TestClient(create_app(backend, loopback_only=True))
        tasks = [
            {"id": 1, "data": {"image": f"{images.url}/a.png"}},
            {"id": 2, "data": {"image": "/data/upload/1/a.png"}},
            {"id": 3, "data": {"image": "s3://shots/cloud.png"}},
        ]
        body = {"tasks": tasks, "label_config": CONFIG, "params": {"login": "ann", "password": "pw"}}
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and len(response.json()["results"]) == 3
        assert list(backend.failures) == []  # every image was fetched
        basic = "Basic " + base64.b64encode(b"ann:pw").decode()
        assert authorizations(images) == [basic]
        assert set(authorizations(label_studio)) == {f"Token {API_KEY}"} and len(label_studio.requests) == 2
        assert [(r.url.path, r.headers.get("Host"), r.headers.get("Authorization")) for r in cdn_requests] == [
            ("/shots/cloud.png", "cdn.example.com", None)
        ]
    finally:
        images.stop()
        label_studio.stop()


class TokenLabelStudio:
    """Label Studio's token refresh and one upload, on loopback: ``POST /api/token/refresh/``
    exchanges the personal access token for ``access-1``, ``access-2``, ...; the upload answers
    401 to an access token not in ``valid`` (new ones are valid while ``accepting``)."""

    def __init__(self, personal_token: str):
        self.refreshes: list[dict] = []
        self.downloads: list[str] = []
        self.valid: set[str] = set()
        self.accepting = True
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/token/refresh/" or body != {"refresh": personal_token}:
                    self._answer(401, b'{"detail": "not a valid refresh token"}')
                    return
                fake.refreshes.append(body)
                access = f"access-{len(fake.refreshes)}"
                if fake.accepting:
                    fake.valid.add(access)
                self._answer(200, json.dumps({"access": access}).encode())

            def do_GET(self) -> None:
                header = self.headers.get("Authorization", "")
                fake.downloads.append(header)
                ok = self.path == "/data/upload/1/a.png" and header.removeprefix("Bearer ") in fake.valid
                self._answer(200, b"image bytes") if ok else self._answer(401, b'{"detail": "expired"}')

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_refused_access_token_is_renewed_once_from_the_personal_access_token():
    personal = "header.payload.signature"  # a JWT's shape: LABEL_STUDIO_API_KEY is a personal access token
    label_studio = TokenLabelStudio(personal)
    try:
        with httpx.Client() as client:
            settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=personal)
            fetcher = fetcher_for(settings, None, client)
            assert fetcher.fetch("/data/upload/1/a.png") == b"image bytes"
            assert fetcher.fetch("/data/upload/1/a.png") == b"image bytes"  # the access token is reused
            assert label_studio.downloads == ["Bearer access-1"] * 2 and len(label_studio.refreshes) == 1

            label_studio.valid.clear()  # Label Studio ended access-1 before usam expected it to
            assert fetcher.fetch("/data/upload/1/a.png") == b"image bytes"
            assert label_studio.downloads[2:] == ["Bearer access-1", "Bearer access-2"]
            assert label_studio.refreshes == [{"refresh": personal}] * 2

            label_studio.accepting = False  # every access token refused from now on: renewed once, no more
            label_studio.valid.clear()
            with pytest.raises(ImageFetchError, match="HTTP 401: Label Studio refused LABEL_STUDIO_API_KEY"):
                fetcher.fetch("/data/upload/1/a.png")
            assert label_studio.downloads[4:] == ["Bearer access-2", "Bearer access-3"]
            assert len(label_studio.refreshes) == 3
    finally:
        label_studio.stop()
