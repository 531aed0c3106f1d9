"""Fetching task images: where from, how much, and what is refused."""

import base64

import httpx
import pytest

from usam_backend.labelstudio.media import (
    FetchLimits,
    ImageFetchError,
    LabelStudioAuth,
    TaskImageFetcher,
    host_allowed,
    is_personal_access_token,
)

from helpers import WebHost, reply


@pytest.fixture
def host(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG fake but fine for fetching")
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    web = WebHost(
        tmp_path,
        {
            "/to-metadata": reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
            "/to-cat": reply(302, headers={"Location": "/cat.png"}),
            "/no-length": reply(200, b"y" * 5000, length=False),
            "/forbidden": reply(403, b"no"),
        },
    )
    yield web
    web.stop()


def fetcher(allowed=("127.0.0.1",), max_bytes=1000, ls_url=None, api_key=None, setup_token=None):
    client = httpx.Client()
    auth = LabelStudioAuth(ls_url, api_key, setup_token, client) if ls_url else None
    return TaskImageFetcher(ls_url, auth, FetchLimits(max_bytes, 5.0, tuple(allowed)), client)


def test_allow_listed_host_is_fetched(host):
    assert fetcher().fetch(f"{host.url}/cat.png").startswith(b"\x89PNG")
    assert fetcher().fetch(f"{host.url}/to-cat").startswith(b"\x89PNG")  # same-host redirect is followed


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("http://169.254.169.254/latest/meta-data/", "neither Label Studio's host nor in USAM_ALLOWED_HOSTS"),
        ("http://[::ffff:169.254.169.254]/", "neither Label Studio's host"),
        ("file:///etc/passwd", "unsupported image reference"),
        ("ftp://example.com/a.png", "unsupported image reference"),
        ("", "empty"),
        ("/data/upload/1/a.png", "set LABEL_STUDIO_URL"),
        ("s3://bucket/a.png", "set LABEL_STUDIO_URL"),
    ],
)
def test_refused_references(reference, message):
    with pytest.raises(ImageFetchError, match=message):
        fetcher().fetch(reference, task_id=1)


def test_link_local_is_refused_even_when_allow_listed():
    with pytest.raises(ImageFetchError, match=r"internal address 169\.254\.169\.254"):
        fetcher(allowed=("169.254.169.254",)).fetch("http://169.254.169.254/latest/meta-data/")


def test_redirect_to_an_internal_address_is_refused(host):
    with pytest.raises(ImageFetchError, match=r"169\.254\.169\.254 is neither"):
        fetcher().fetch(f"{host.url}/to-metadata")


def test_loopback_needs_an_explicit_allow_list_entry(host):
    with pytest.raises(ImageFetchError, match="neither Label Studio's host"):
        fetcher(allowed=("example.com",)).fetch(f"{host.url}/cat.png")


@pytest.mark.parametrize("path", ["/big.bin", "/no-length"])
def test_size_limit(host, path):
    with pytest.raises(ImageFetchError, match=r"over 1,000 bytes.*USAM_MAX_IMAGE_BYTES"):
        fetcher().fetch(f"{host.url}{path}")


def test_http_errors_are_reported(host):
    with pytest.raises(ImageFetchError, match="answered HTTP 404"):
        fetcher().fetch(f"{host.url}/missing.png")
    with pytest.raises(ImageFetchError, match="answered HTTP 403"):
        fetcher().fetch(f"{host.url}/forbidden")


def test_unreachable_host():
    with pytest.raises(ImageFetchError, match="could not download"):
        fetcher().fetch("http://127.0.0.1:9/a.png")


def test_label_studio_paths_carry_the_token_and_others_do_not(host):
    ls = fetcher(allowed=(), ls_url=host.url, setup_token="a" * 40)
    assert ls.fetch("/cat.png").startswith(b"\x89PNG")
    assert host.requests[-1][1].get("Authorization") == "Token " + "a" * 40
    other = WebHost(host.root)
    try:
        allowed = fetcher(allowed=("127.0.0.1",), ls_url=host.url, setup_token="a" * 40)
        allowed.fetch(f"{other.url}/cat.png")
        assert "Authorization" not in other.requests[-1][1]  # Label Studio's token stays with Label Studio
    finally:
        other.stop()


def test_cloud_uris_go_through_label_studios_presign_endpoint():
    f = fetcher(ls_url="http://ls.example:8080")
    url = f.resolve("s3://bucket/dir/cat.png", task_id=7)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/dir/cat.png").decode()
    assert url == f"http://ls.example:8080/tasks/7/presign/?fileuri={encoded}"
    assert (
        f.resolve("/data/local-files/?d=images/a.png", 7) == "http://ls.example:8080/data/local-files/?d=images/a.png"
    )


def test_token_kinds():
    assert is_personal_access_token("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl")
    assert not is_personal_access_token("0123456789abcdef0123456789abcdef01234567")
    assert host_allowed("img.example.com", ("*.example.com",)) and not host_allowed("example.org", ("*.example.com",))
