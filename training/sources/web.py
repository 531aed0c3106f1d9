"""Openly licensed class images from the web: Openverse first, then Wikimedia Commons.

No API key is needed. Every image keeps its licence, author, title and source page in the class
manifest (attribution is owed). Duplicates (same bytes or same URL) and images under
``USAM_WEB_MIN_SIDE`` are dropped. Requests to an API are spaced by ``USAM_WEB_INTERVAL``; a 429
or 503 is retried after ``Retry-After`` (or an exponential back-off). Openverse's anonymous limits
are low, and the store keeps everything fetched, so a label is only ever searched once.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from training.class_store import ClassFolder, ClassStore
from training.progress import Progress
from usam_backend.core.errors import DataError, ImageError
from usam_backend.core.fetch import FetchLimits, GuardedFetcher, ImageFetchError
from usam_backend.core.images import load_image
from usam_backend.core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_COUNT = 45
USER_AGENT = "usam/0.1 (Label Studio pre-annotation backend; fetches openly licensed class images for training)"
OPENVERSE_PAGE = 20
COMMONS_PAGE = 50
MAX_ATTEMPTS = 5
MAX_WAIT = 120.0


@dataclass
class Candidate:
    image_url: str
    meta: dict[str, Any] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None


class PoliteClient:
    """JSON GETs spaced ``interval`` seconds apart per host, retrying 429/503 as the server asks."""

    def __init__(self, http: httpx.Client, interval: float, timeout: float):
        self.http = http
        self.interval = interval
        self.timeout = timeout
        self._last: dict[str, float] = {}

    def get_json(self, url: str, params: dict[str, Any], api: str) -> dict[str, Any]:
        host = urlsplit(url).netloc
        for attempt in range(MAX_ATTEMPTS):
            wait = self._last.get(host, 0.0) + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last[host] = time.monotonic()
            try:
                response = self.http.get(url, params=params, headers={"User-Agent": USER_AGENT}, timeout=self.timeout)
            except httpx.HTTPError as exc:
                raise DataError(f"could not reach {api} at {url} ({exc})") from None
            if response.status_code in (429, 503):
                delay = _retry_after(response) or 2.0**attempt
                log.warning("%s answered %d; waiting %.0f s", api, response.status_code, min(delay, MAX_WAIT))
                time.sleep(min(delay, MAX_WAIT))
                continue
            if response.status_code >= 400:
                raise DataError(f"{api} answered HTTP {response.status_code} for {response.url}")
            try:
                data = response.json()
            except ValueError:
                raise DataError(f"{api} did not answer JSON at {response.url}") from None
            return data if isinstance(data, dict) else {}
        raise DataError(f"{api} kept refusing with HTTP 429/503; try again later (usam resumes where it stopped)")


class WebSource:
    name = "web"

    def __init__(self, settings: Settings, store: ClassStore, http: httpx.Client | None = None):
        self.settings = settings
        self.store = store
        self.http = http or httpx.Client(follow_redirects=False)
        self.api = PoliteClient(self.http, settings.web_interval, settings.fetch_timeout)
        limits = FetchLimits(settings.max_image_bytes, settings.fetch_timeout, settings.allowed_hosts)
        self.downloads = GuardedFetcher(limits, self.http)

    def key(self) -> str:
        s = self.settings
        shaping = f"{s.openverse_url}|{s.commons_url}|{s.web_licenses}|{s.web_min_side}"
        return f"web-{hashlib.sha256(shaping.encode()).hexdigest()[:12]}"

    def default_count(self) -> int | None:
        return DEFAULT_COUNT

    def collect(self, label: str, count: int | None, progress: Progress) -> list[Path]:
        count = count or DEFAULT_COUNT
        with self.store.open(self.key(), label) as folder:
            progress.advance(min(len(folder.manifest.images), count))
            while len(folder.manifest.images) < count and not folder.manifest.exhausted:
                candidates = self._next_page(label, folder.manifest.cursor)
                if candidates is None:
                    folder.manifest.exhausted = True
                else:
                    self._keep(folder, candidates, count, progress)
                folder.save()
            if not folder.manifest.images:
                raise DataError(f"found no usable openly licensed web image for {label!r} (Openverse, Commons)")
            return folder.paths(count)

    def describe(self, label: str) -> dict[str, object]:
        with self.store.open(self.key(), label) as folder:
            licences: dict[str, int] = {}
            for image in folder.manifest.images:
                name = str(image.meta.get("license", "unknown"))
                licences[name] = licences.get(name, 0) + 1
            return {
                "source": "web",
                "images": len(folder.manifest.images),
                "licenses": licences,
                "attribution": f"{folder.manifest_path} lists author, licence and source page of every image",
            }

    def _keep(self, folder: ClassFolder, candidates: list[Candidate], count: int, progress: Progress) -> None:
        seen = {str(image.meta.get("image_url")) for image in folder.manifest.images}
        minimum = self.settings.web_min_side
        for candidate in candidates:
            if len(folder.manifest.images) >= count:
                return
            small = candidate.width is not None and candidate.height is not None
            if candidate.image_url in seen or (small and min(candidate.width or 0, candidate.height or 0) < minimum):
                continue
            seen.add(candidate.image_url)
            try:
                data = self.downloads.fetch_public(candidate.image_url)
                pixels = load_image(data, max_pixels=self.settings.max_image_pixels)
            except (ImageFetchError, ImageError) as exc:
                log.info("skipping %s: %s", candidate.image_url, exc)
                continue
            if min(pixels.shape[:2]) < minimum:
                continue
            extension = (Image.open(io.BytesIO(data)).format or "jpg").lower().replace("jpeg", "jpg")
            if folder.add(data, extension, {**candidate.meta, "image_url": candidate.image_url}):
                progress.advance(1)

    def _next_page(self, label: str, cursor: dict[str, Any]) -> list[Candidate] | None:
        """The next page of candidates (advancing ``cursor``), or None when both APIs are exhausted."""
        if not cursor.get("openverse_done"):
            page = int(cursor.get("openverse_page", 1))
            candidates, last = self._openverse(label, page)
            cursor["openverse_page"] = page + 1
            cursor["openverse_done"] = last
            if candidates or not last:
                return candidates
        if not cursor.get("commons_done"):
            offset = int(cursor.get("commons_offset", 0))
            candidates, next_offset = self._commons(label, offset)
            cursor["commons_offset"] = next_offset
            cursor["commons_done"] = next_offset is None
            return candidates
        return None

    def _openverse(self, label: str, page: int) -> tuple[list[Candidate], bool]:
        url = self.settings.openverse_url.rstrip("/") + "/v1/images/"
        params = {"q": label, "license": self.settings.web_licenses, "page_size": OPENVERSE_PAGE, "page": page}
        data = self.api.get_json(url, params, "Openverse")
        results = data.get("results") or []
        candidates = []
        for item in results:
            if not isinstance(item, dict) or not item.get("url"):
                continue
            meta = {
                "api": "openverse",
                "license": _licence(item.get("license"), item.get("license_version")),
                "license_url": item.get("license_url"),
                "author": item.get("creator"),
                "title": item.get("title"),
                "source_page": item.get("foreign_landing_url"),
            }
            candidates.append(Candidate(str(item["url"]), meta, _int(item.get("width")), _int(item.get("height"))))
        page_count = _int(data.get("page_count")) or 0
        return candidates, not results or page >= page_count

    def _commons(self, label: str, offset: int) -> tuple[list[Candidate], int | None]:
        params = {
            "action": "query", "generator": "search", "gsrsearch": label, "gsrnamespace": 6,
            "gsrlimit": COMMONS_PAGE, "gsroffset": offset, "prop": "imageinfo",
            "iiprop": "url|size|mime|extmetadata", "iiurlwidth": 512, "format": "json", "formatversion": 2,
        }  # fmt: skip
        data = self.api.get_json(self.settings.commons_url, params, "Wikimedia Commons")
        candidates = []
        for page in (data.get("query") or {}).get("pages") or []:
            info = (page.get("imageinfo") or [{}])[0] if isinstance(page, dict) else {}
            if not str(info.get("mime", "")).startswith("image/") or info.get("mime") == "image/svg+xml":
                continue
            extra = info.get("extmetadata") or {}
            meta = {
                "api": "commons",
                "license": _text(extra.get("LicenseShortName")),
                "license_url": _text(extra.get("LicenseUrl")),
                "author": _text(extra.get("Artist")),
                "title": page.get("title"),
                "source_page": info.get("descriptionurl"),
            }
            image_url = info.get("thumburl") or info.get("url")
            if image_url:
                candidates.append(Candidate(str(image_url), meta, _int(info.get("thumbwidth") or info.get("width")),
                                            _int(info.get("thumbheight") or info.get("height"))))  # fmt: skip
        following = (data.get("continue") or {}).get("gsroffset")
        return candidates, _int(following)


def _licence(name: object, version: object) -> str:
    text = str(name or "unknown").upper().replace("_", "-")
    return f"{text} {version}" if version else text


def _text(field_: object) -> str | None:
    """An extmetadata field's value without HTML markup."""
    if not isinstance(field_, dict) or field_.get("value") is None:
        return None
    return html.unescape(re.sub(r"<[^>]+>", "", str(field_["value"]))).strip() or None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
