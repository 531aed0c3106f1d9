"""Property-based fuzzing of the served OpenAPI document (schemathesis): whatever a caller sends,
no 5xx and no traceback; oversized bodies get 413 however they arrive."""

from __future__ import annotations

import socket

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from helpers import UsamServer

CONFIG = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="tomato"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, trained_head):
    models = tmp_path_factory.mktemp("fuzz-models")
    trained_head.save(models / "heads" / "head.pt")
    env = {
        "USAM_SAM_TYPE": "tiny", "USAM_DEVICE": "cpu", "USAM_POINTS": "16", "USAM_MODEL_DIR": str(models),
        "USAM_CACHE_DIR": str(tmp_path_factory.mktemp("fuzz-cache")), "USAM_AUTO_TRAIN": "false",
        "USAM_FETCH_TIMEOUT": "2",
    }  # fmt: skip
    # Bound beyond loopback without authentication: /setup hostnames are not trusted, so nothing fuzzed
    # makes usam connect anywhere (the trust boundary is tested in test_trust.py).
    server = UsamServer(env, tmp_path_factory.mktemp("logs") / "fuzz.log", host="0.0.0.0")
    assert server.client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
    yield server
    server.stop()


def operations(server: UsamServer) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_no_request_gets_a_server_error_or_a_traceback(fuzzed):
    """Hypothesis drives schemathesis' strategies for every operation of the served schema (the
    strategies, not schemathesis' pytest plugin, which does not support this pytest yet)."""
    found = operations(fuzzed)
    assert {op.label for op in found} >= {"POST /setup", "POST /predict", "POST /webhook", "GET /health"}
    calls: dict[str, int] = {}
    for operation in found:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def call(case) -> None:
            response = case.call(base_url=fuzzed.url, timeout=60)
            label = f"{case.method} {case.path}"
            calls[label] = calls.get(label, 0) + 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            assert response.status_code < 500, where
            assert "Traceback" not in response.text and 'File "' not in response.text, where
            if response.status_code >= 400:
                assert "error" in response.json(), where  # a clear JSON error

        call()
    print(f"\nfuzzed: {calls}")
    assert fuzzed.alive() and sum(calls.values()) >= 100


def test_oversized_bodies_get_413_declared_or_chunked(fuzzed):
    size = 64 * 1024 * 1024 + 1

    def chunks():
        block = b" " * (1024 * 1024)
        sent = 0
        while sent < size:
            yield block
            sent += len(block)

    chunked = fuzzed.client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and "request body over" in chunked.json()["error"]
    with socket.create_connection(("127.0.0.1", fuzzed.port), timeout=30) as conn:  # declares, sends 2 bytes
        conn.sendall(
            f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n{{}}".encode()
        )
        status_line = conn.recv(200).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    assert fuzzed.client.get("/ping").status_code == 200
