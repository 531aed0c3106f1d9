"""Fetching task images the way Label Studio stores them, and only from where they may come.

References a task may hold: ``/data/upload/...`` and ``/data/local-files/?d=...`` (relative to
Label Studio), ``http(s)://`` URLs, and cloud URIs (``s3://``, ``gs://``, ``azure-blob://``,
``azure-spi://``) that Label Studio resolves through ``/tasks/<id>/presign/``.

Hosts: Label Studio's own, and those in ``USAM_ALLOWED_HOSTS``; a redirect from Label Studio (a
presigned storage URL) may go to any public host. Link-local, multicast and reserved addresses
(cloud metadata endpoints among them) are always refused, private ones unless allow-listed; only
``LABEL_STUDIO_URL``, which the operator named, is fetched whatever its address.
"""

from __future__ import annotations

import base64
import threading
import time
from urllib.parse import urlsplit

import httpx

from usam_backend.core.fetch import FetchLimits, GuardedFetcher, ImageFetchError, host_allowed, origin, redact_url
from usam_backend.core.settings import Settings
from usam_backend.labelstudio.projects import ProjectRecord, label_studio_origin

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "azure-spi://")
ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes; refresh a little early

__all__ = ["FetchLimits", "ImageFetchError", "LabelStudioAuth", "TaskImageFetcher", "fetcher_for", "host_allowed"]


def is_personal_access_token(key: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts); legacy tokens are 40 hex digits."""
    return key.count(".") == 2


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
                f"could not reach Label Studio at {redact_url(url)} to refresh the access token ({exc})"
            ) from None
        if response.status_code != 200 or "access" not in _json(response):
            raise ImageFetchError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY (HTTP {response.status_code})"
            )
        return str(_json(response)["access"])


class TaskImageFetcher(GuardedFetcher):
    """Resolves task image references and downloads them within :class:`FetchLimits`."""

    def __init__(self, label_studio_url: str | None, auth: LabelStudioAuth | None, limits: FetchLimits,
                 client: httpx.Client, *, named_by_operator: bool = False):  # fmt: skip
        """``named_by_operator``: Label Studio's URL is ``LABEL_STUDIO_URL`` (fetched at any address),
        not a ``/setup`` hostname (never link-local, multicast or reserved addresses)."""
        super().__init__(limits, client)
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.auth = auth
        self.named_by_operator = named_by_operator

    def resolve(self, reference: str, task_id: int | None) -> str:
        """The absolute URL to download for a task's image reference."""
        if not isinstance(reference, str) or not reference.strip():
            raise ImageFetchError(f"the task's image field is empty or not a string: {reference!r}")
        reference = reference.strip()
        if reference.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageFetchError(f"{redact_url(reference)} needs a task id to be presigned by Label Studio")
            encoded = base64.urlsafe_b64encode(reference.encode()).decode()
            return f"{self._label_studio(reference)}/tasks/{task_id}/presign/?fileuri={encoded}"
        if reference.startswith("/"):
            return self._label_studio(reference) + reference
        if reference.startswith(("http://", "https://")):
            return reference
        raise ImageFetchError(f"unsupported image reference {redact_url(reference)!r}: expected a URL or a /data/ path")

    def fetch(self, reference: str, task_id: int | None = None, basic_auth: tuple[str, str] | None = None) -> bytes:
        """Download a task image, following a bounded number of redirects, each one checked."""
        return self._download(self.resolve(reference, task_id), basic_auth, public=False)

    def _label_studio(self, reference: str) -> str:
        if not self.label_studio_url:
            raise ImageFetchError(
                f"{redact_url(reference)} is stored in Label Studio, but its URL is unknown: set LABEL_STUDIO_URL "
                "(or let Label Studio call /setup first)"
            )
        return self.label_studio_url

    def _is_trusted(self, url: str) -> bool:
        return self.label_studio_url is not None and origin(url) == origin(self.label_studio_url)

    def _trusted_anywhere(self, url: str) -> bool:
        return self.named_by_operator and self._is_trusted(url)

    def _headers(self, url: str, trusted: bool, basic_auth: tuple[str, str] | None) -> dict[str, str]:
        if trusted:
            return self.auth.header() if self.auth else {}
        if basic_auth and host_allowed(urlsplit(url).hostname or "", self.limits.allowed_hosts):
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}

    def _renew_credentials(self, url: str, trusted: bool) -> bool:
        if trusted and self.auth is not None and self.auth.uses_pat:
            self.auth.header(renew=True)
            return True
        return False

    def _http_error(self, url: str, status: int, trusted: bool) -> str:
        message = f"{redact_url(url)} answered HTTP {status}"
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


def _json(response: httpx.Response) -> dict[str, object]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def fetcher_for(
    settings: Settings, record: ProjectRecord | None, client: httpx.Client, *, video: bool = False
) -> TaskImageFetcher:
    """A fetcher for one project's task images (``video``: its videos, up to ``USAM_MAX_VIDEO_BYTES``),
    from its Label Studio (:func:`label_studio_origin`)."""
    origin = label_studio_origin(settings, record)
    auth = None
    if origin.url:
        auth = LabelStudioAuth(origin.url, origin.api_key, origin.setup_token, client)
    max_bytes = settings.max_video_bytes if video else settings.max_image_bytes
    setting = "USAM_MAX_VIDEO_BYTES" if video else "USAM_MAX_IMAGE_BYTES"
    limits = FetchLimits(max_bytes, settings.fetch_timeout, settings.allowed_hosts, setting)
    return TaskImageFetcher(origin.url, auth, limits, client, named_by_operator=origin.named_by_operator)
