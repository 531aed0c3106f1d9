"""Test helpers: a real ``usam serve`` process, a real Label Studio, and a loopback web host for task images."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from label_studio_sdk import LabelStudio

ROOT = Path(__file__).resolve().parents[1]
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
TINY = ["--sam", "tiny", "--device", "cpu", "--points", "16"]  # CLI flags: the tiny random SAM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class UsamServer:
    """``usam serve`` in a subprocess on a free loopback port, with the given environment."""

    def __init__(self, env: dict[str, str], log_path: Path, *, host: str = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "usam_backend.cli", "serve", "--host", host, "--port", str(self.port)],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        auth = (env["BASIC_AUTH_USER"], env["BASIC_AUTH_PASS"]) if "BASIC_AUTH_USER" in env else None
        self.client = httpx.Client(base_url=self.url, timeout=120, auth=auth)
        try:
            wait_until(self._up, 120, f"usam serve on port {self.port}")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"usam serve did not start:\n{self.log()}") from None

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"usam serve exited with {self.process.returncode}:\n{self.log()}")
        return self.client.get("/ping").status_code == 200

    def health(self) -> dict[str, Any]:
        response = self.client.get("/health")
        response.raise_for_status()
        return dict(response.json())

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.client.close()
        self._log.close()


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class WebHost:
    """A loopback HTTP server serving files from ``root`` plus programmable routes.

    It stands in for image hosts on the internet (and their misbehaviour) in tests.
    """

    def __init__(self, root: Path, routes: dict[str, Route] | None = None):
        self.root = root
        self.routes = routes or {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(host.root), **kwargs)

            def do_GET(self) -> None:
                host.requests.append((self.path, dict(self.headers)))
                route = host.routes.get(self.path.split("?", 1)[0])
                if route is not None:
                    route(self)
                else:
                    super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, length: bool = True) -> Route:
    """A canned response; with ``length=False`` no Content-Length is sent (the body ends at close)."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True

    return route


def run_worker(env: dict[str, str], *, burst: bool = True, log=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "usam_backend.cli", "worker", *(["--burst"] if burst else [])]
    return subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT, stdout=log or subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def label_studio_binary() -> Path | None:
    configured = os.environ.get("USAM_TEST_LABEL_STUDIO")
    default = Path.home() / ".cache/usam-test/label-studio-1.23.2/bin/label-studio"
    path = Path(configured) if configured else default
    return path if path.exists() else None


def project_config(template: str, labels: dict[str, str | None]) -> str:
    """A shipped template with its example labels replaced by ours, in every labels control."""
    root = ET.fromstring((ROOT / "label_config" / template).read_text())
    for control in root:
        if control.tag in ("BrushLabels", "PolygonLabels", "EllipseLabels", "KeyPointLabels", "RectangleLabels",
                           "Labels"):  # fmt: skip
            smart = control.tag == "KeyPointLabels"
            for child in list(control):
                control.remove(child)
            for value, aliases in labels.items():
                attrs = {"value": value, **({"predicted_values": aliases} if aliases else {})}
                ET.SubElement(control, "Label", {**attrs, **({"smart": "true"} if smart else {})})
    return ET.tostring(root, encoding="unicode")


class LabelStudioServer:
    def __init__(self, binary: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files = workdir / "files"
        self.files.mkdir()
        env = {
            **os.environ,
            "LABEL_STUDIO_USERNAME": "admin@example.com",
            "LABEL_STUDIO_PASSWORD": "not-a-real-password-42",
            "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.files),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_HOST": self.url,
        }
        self.log_path = workdir / "label-studio.log"
        self._log = self.log_path.open("w")
        command = [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)]
        command += ["--data-dir", str(workdir / "data")]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=120)
        try:  # the first start migrates a fresh database
            wait_until(lambda: self._alive() and self.http.get("/api/projects").status_code == 200, 400, "Label Studio")
        except TimeoutError:
            self.stop()
            raise RuntimeError("Label Studio did not start:\n" + self.log_path.read_text()[-4000:]) from None
        self.sdk = LabelStudio(base_url=self.url, api_key=LEGACY_TOKEN)
        self._personal_token: str | None = None

    def personal_token(self) -> str:
        """The admin's personal access token (created once: Label Studio keeps one per user)."""
        if self._personal_token is None:
            response = self.http.post("/api/token/")
            assert response.status_code == 201, response.text
            self._personal_token = str(response.json()["token"])
        return self._personal_token

    def allow_legacy_tokens(self, enabled: bool) -> None:
        """The organisation's legacy-token switch, set with the personal access token (which works
        either way), so one test's refusal does not outlive it."""
        refreshed = httpx.post(f"{self.url}/api/token/refresh", json={"refresh": self.personal_token()}, timeout=30)
        refreshed.raise_for_status()
        response = httpx.post(
            f"{self.url}/api/jwt/settings", json={"legacy_api_tokens_enabled": enabled}, timeout=30,
            headers={"Authorization": f"Bearer {refreshed.json()['access']}"},
        )  # fmt: skip
        assert response.status_code in (200, 201), response.text

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError("Label Studio exited:\n" + self.log_path.read_text()[-4000:])
        return True

    def upload(self, project: int, path: Path, mime: str = "image/png") -> None:
        with path.open("rb") as file:
            response = self.http.post(f"/api/projects/{project}/import", files={"file": (path.name, file, mime)})
        response.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def tiny_backend(tmp_path: Path, **extra: Any) -> Any:
    """A backend with the tiny SAM, heads in ``tmp_path/models/heads``, task media on loopback allowed."""
    from usam_backend.core.settings import Settings
    from usam_backend.server.service import Backend

    settings = Settings(sam_type="tiny", device="cpu", points=64, cache_dir=tmp_path / "cache",
                        model_dir=tmp_path / "models", allowed_hosts=("127.0.0.1",), score_threshold=0.2,
                        **extra)  # fmt: skip
    return Backend(settings)
