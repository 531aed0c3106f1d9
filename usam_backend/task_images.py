"""Fetching task images the way Label Studio stores them, and only from where they may come.

References a task may hold: ``/data/upload/...`` and ``/data/local-files/?d=...`` (relative to
Label Studio), ``http(s)://`` URLs, and cloud URIs (``s3://``, ``gs://``, ``azure-blob://``,
``azure-spi://``) that Label Studio resolves through ``/tasks/<id>/presign/``.

Hosts: Label Studio's own, and those in ``USAM_ALLOWED_HOSTS``; a redirect from Label Studio (a
presigned storage URL) may go to any public host. Link-local, multicast and reserved addresses
(cloud metadata endpoints among them) are always refused, private ones unless allow-listed.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from usam_backend.errors import UsamError
from usam_backend.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "azure-spi://")
MAX_REDIRECTS = 5
ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes; refresh a little early


class ImageFetchError(UsamError):
    """A task image could not be fetched (refused host, HTTP error, too large, ...)."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float
    allowed_hosts: tuple[str, ...] = ()


def is_personal_access_token(key: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts); legacy tokens are 40 hex digits."""
    return key.count(".") == 2


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class LabelStudioAuth:
    """The Authorization header for Label Studio: ``Token <legacy>`` or ``Bearer <access>``.

    A personal access token is a refresh token: it is exchanged at ``/api/token/refresh/`` for a
    short-lived access token, cached, and exchanged again when it expires or is refused.
    """

    def __init__(self, base_url: str, api_key: str | None, setup_token: str | None, client: httpx.Client):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.setup_token = setup_token
        self.client = client
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @property
    def uses_pat(self) -> bool:
        return bool(self.api_key) and is_personal_access_token(self.api_key or "")

    def header(self, *, renew: bool = False) -> dict[str, str]:
        key = self.api_key or self.setup_token
        if not key:
            return {}
        if not is_personal_access_token(key):
            return {"Authorization": f"Token {key}"}
        with self._lock:
            if renew or self._access is None or self._access[1] < time.monotonic():
                self._access = (self._refresh(key), time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self, refresh_token: str) -> str:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = self.client.post(url, json={"refresh": refresh_token})
        except httpx.HTTPError as exc:
            raise ImageFetchError(
                f"could not reach Label Studio at {url} to refresh the access token ({exc})"
            ) from None
        if response.status_code != 200 or "access" not in _json(response):
            raise ImageFetchError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY (HTTP {response.status_code})"
            )
        return str(_json(response)["access"])


class TaskImageFetcher:
    """Resolves and downloads task images within :class:`FetchLimits`."""

    def __init__(self, label_studio_url: str | None, auth: LabelStudioAuth | None, limits: FetchLimits,
                 client: httpx.Client):  # fmt: skip
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.auth = auth
        self.limits = limits
        self.client = client

    def resolve(self, reference: str, task_id: int | None) -> str:
        """The absolute URL to download for a task's image reference."""
        if not isinstance(reference, str) or not reference.strip():
            raise ImageFetchError(f"the task's image field is empty or not a string: {reference!r}")
        reference = reference.strip()
        if reference.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageFetchError(f"{reference} needs a task id to be presigned by Label Studio")
            encoded = base64.urlsafe_b64encode(reference.encode()).decode()
            return f"{self._label_studio(reference)}/tasks/{task_id}/presign/?fileuri={encoded}"
        if reference.startswith("/"):
            return self._label_studio(reference) + reference
        if reference.startswith(("http://", "https://")):
            return reference
        raise ImageFetchError(f"unsupported image reference {reference[:100]!r}: expected a URL or a /data/ path")

    def fetch(self, reference: str, task_id: int | None = None, basic_auth: tuple[str, str] | None = None) -> bytes:
        """Download a task image, following at most ``MAX_REDIRECTS`` redirects, each one checked."""
        return self._download(self.resolve(reference, task_id), basic_auth, public=False)

    def fetch_public(self, url: str) -> bytes:
        """Download from any public host (web class images); internal addresses only if allow-listed."""
        if not url.startswith(("http://", "https://")):
            raise ImageFetchError(f"unsupported image URL {url[:100]!r}")
        return self._download(url, None, public=True)

    def _download(self, url: str, basic_auth: tuple[str, str] | None, *, public: bool) -> bytes:
        vouched = public
        renewed = False
        for _ in range(MAX_REDIRECTS + 1):
            trusted = self._is_label_studio(url)
            self._check_destination(url, trusted=trusted, vouched=vouched)
            headers = self._headers(url, trusted, basic_auth)
            try:
                with self.client.stream("GET", url, headers=headers, timeout=self.limits.timeout) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        vouched = trusted or public
                        continue
                    if response.status_code == 401 and trusted and self.auth and self.auth.uses_pat and not renewed:
                        self.auth.header(renew=True)
                        renewed = True
                        continue
                    if response.status_code >= 400:
                        raise ImageFetchError(self._http_error(url, response.status_code, trusted))
                    return self._read(url, response)
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"could not download {_short(url)}: {type(exc).__name__} {exc}") from None
        raise ImageFetchError(f"too many redirects fetching {_short(url)}")

    def _label_studio(self, reference: str) -> str:
        if not self.label_studio_url:
            raise ImageFetchError(
                f"{_short(reference)} is stored in Label Studio, but its URL is unknown: set LABEL_STUDIO_URL "
                "(or let Label Studio call /setup first)"
            )
        return self.label_studio_url

    def _is_label_studio(self, url: str) -> bool:
        return self.label_studio_url is not None and _origin(url) == _origin(self.label_studio_url)

    def _headers(self, url: str, trusted: bool, basic_auth: tuple[str, str] | None) -> dict[str, str]:
        if trusted:
            return self.auth.header() if self.auth else {}
        if basic_auth and host_allowed(urlsplit(url).hostname or "", self.limits.allowed_hosts):
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}

    def _check_destination(self, url: str, *, trusted: bool, vouched: bool) -> None:
        """Label Studio: fine. Otherwise the host must be allow-listed, unless Label Studio (or, for
        web class images, the caller) vouches for public hosts; never an internal address."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageFetchError(f"refusing to fetch {_short(url)}: only http(s) URLs are fetched")
        if trusted:
            return
        host = parts.hostname
        allowed = host_allowed(host, self.limits.allowed_hosts)
        if not allowed and not vouched:
            raise ImageFetchError(
                f"refusing to fetch {_short(url)}: {host} is neither Label Studio's host nor in USAM_ALLOWED_HOSTS"
            )
        for address in _addresses(host, parts.port or (443 if parts.scheme == "https" else 80)):
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            internal = address.is_link_local or address.is_multicast or address.is_reserved or address.is_unspecified
            if internal or (not allowed and (address.is_private or address.is_loopback)):
                raise ImageFetchError(f"refusing to fetch {_short(url)}: {host} resolves to internal address {address}")

    def _read(self, url: str, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
            raise ImageFetchError(self._too_large(url, int(declared)))
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.limits.max_bytes:
                raise ImageFetchError(self._too_large(url, len(body)))
        return bytes(body)

    def _too_large(self, url: str, size: int) -> str:
        return (
            f"{_short(url)} is over {self.limits.max_bytes:,} bytes ({size:,} seen); raise USAM_MAX_IMAGE_BYTES "
            "to accept it"
        )

    def _http_error(self, url: str, status: int, trusted: bool) -> str:
        message = f"{_short(url)} answered HTTP {status}"
        if trusted and status in (401, 403):
            if self.auth is None or not (self.auth.api_key or self.auth.setup_token):
                return f"{message}: Label Studio needs a token, set LABEL_STUDIO_API_KEY"
            if not self.auth.api_key:
                return (
                    f"{message}: Label Studio refused the legacy token it sent to /setup (organisations that allow "
                    "personal access tokens only refuse it); set LABEL_STUDIO_API_KEY to a personal access token"
                )
            return f"{message}: Label Studio refused LABEL_STUDIO_API_KEY"
        return message


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ImageFetchError(f"cannot resolve image host {host}: {exc}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def _json(response: httpx.Response) -> dict[str, object]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _short(url: str, limit: int = 160) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def fetcher_for(
    settings: Settings, hostname: str | None, access_token: str | None, client: httpx.Client
) -> TaskImageFetcher:
    """A fetcher for one project: Label Studio at ``LABEL_STUDIO_URL`` (else the hostname its
    /setup sent), with ``LABEL_STUDIO_API_KEY`` (else the project's /setup token)."""
    url = settings.label_studio_url or hostname
    auth = LabelStudioAuth(url, settings.label_studio_api_key, access_token, client) if url else None
    limits = FetchLimits(settings.max_image_bytes, settings.fetch_timeout, settings.allowed_hosts)
    return TaskImageFetcher(url, auth, limits, client)
