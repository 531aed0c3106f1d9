"""Downloads end: ``USAM_FETCH_TIMEOUT`` bounds a whole download, however slowly a host answers, and
what a failed download reports names the host and path, never the credentials in the URL."""

from __future__ import annotations

import http.server
import time

import httpx
import pytest

from usam_backend.core.fetch import FetchLimits, GuardedFetcher, ImageFetchError, redact_url
from usam_backend.labelstudio.media import TaskImageFetcher

from helpers import WebHost, free_port, reply

TRICKLE_BYTES = 20
TRICKLE_EVERY = 0.3  # seconds between bytes: each read is quick, the whole body takes 6 s


def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A body sent one byte at a time, as a slow (or hostile) host does."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(TRICKLE_BYTES))
    handler.end_headers()
    try:
        for _ in range(TRICKLE_BYTES):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(TRICKLE_EVERY)
    except OSError:  # the client gave up
        pass
    handler.close_connection = True


def stall(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Headers and one byte, then silence longer than any test waits."""
    handler.send_response(200)
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"x")
    handler.wfile.flush()
    time.sleep(5)
    handler.close_connection = True


@pytest.fixture
def host(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image bytes")
    routes = {
        "/trickle": trickle,
        "/stall": stall,
        "/hop": reply(302, headers={"Location": "/trickle"}),
        "/missing": reply(404),
    }
    running = WebHost(tmp_path, routes)
    yield running
    running.stop()


def fetcher(client: httpx.Client, timeout: float = 5.0) -> GuardedFetcher:
    return GuardedFetcher(FetchLimits(1000, timeout, ("127.0.0.1",)), client)


@pytest.mark.parametrize("path", ["/trickle", "/hop", "/stall"])
def test_a_slow_body_fails_at_the_timeout_not_when_it_ends(host, path):
    with httpx.Client() as client:
        started = time.monotonic()
        with pytest.raises(ImageFetchError, match=r"did not finish downloading within USAM_FETCH_TIMEOUT=1 s"):
            fetcher(client, timeout=1.0).fetch_public(host.url + path)
        took = time.monotonic() - started
    print(f"\n{path}: failed after {took:.2f} s with USAM_FETCH_TIMEOUT=1 s")
    assert 0.9 < took < 2.0


def test_a_quick_download_still_succeeds(host):
    with httpx.Client() as client:
        assert fetcher(client, timeout=1.0).fetch_public(host.url + "/a.png") == b"image bytes"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://bucket.s3.amazonaws.com/a/b.png?X-Amz-Signature=secret&X-Amz-Credential=key",
         "https://bucket.s3.amazonaws.com/a/b.png?…"),
        ("http://user:pass@images.test:8080/a.png", "http://images.test:8080/a.png"),
        ("http://user:pass@[::1]:8080/a.png#frag", "http://[::1]:8080/a.png?…"),
        ("https://example.com/a.png", "https://example.com/a.png"),
        ("/data/upload/1/a.png", "/data/upload/1/a.png"),
        ("s3://bucket/key.png", "s3://bucket/key.png"),
        ("https://example.com/" + "p" * 300, "https://example.com/" + "p" * 137 + "..."),
    ],
)  # fmt: skip
def test_redact_url_keeps_where_and_drops_secrets(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("where", ["answers 404", "refuses the connection", "is not allowed"])
def test_a_failed_fetch_names_no_credentials(host, where):
    port = {"answers 404": host.server.server_port, "refuses the connection": free_port()}.get(where, 80)
    address = "images.test" if where == "is not allowed" else "127.0.0.1"
    url = f"http://user:pass@{address}:{port}/missing.png?X-Amz-Signature=secret#token"
    with httpx.Client() as client, pytest.raises(ImageFetchError) as failure:
        TaskImageFetcher(None, None, FetchLimits(1000, 5.0, ("127.0.0.1",)), client).fetch(url)
    message = str(failure.value)
    assert f"http://{address}:{port}/missing.png?…" in message, message
    assert "pass" not in message and "secret" not in message and "token" not in message, message
