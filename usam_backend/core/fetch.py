"""Guarded HTTP downloads: only http(s), bounded size and time, redirects checked hop by hop, and
never to an internal address the operator did not allow.

Time: ``USAM_FETCH_TIMEOUT`` is a deadline for the whole download of one URL (every redirect hop,
connecting, headers and body), so a host that sends a byte now and then cannot hold a request.
URLs in messages go through :func:`redact_url`: presigned query strings and ``user:pass@`` never
reach a log, ``/health`` or a job's error.

A host name is resolved once; the addresses are checked, and the connection goes to the checked
address (the name still goes in the ``Host`` header and TLS's server name), so a DNS answer that
changes between the check and the connection (rebinding) cannot redirect it.

:class:`GuardedFetcher` downloads from public hosts (web class images). Label Studio's task media
(:mod:`usam_backend.labelstudio.media`) builds on it with its own trusted origin and credentials.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from usam_backend.core.errors import UsamError

MAX_REDIRECTS = 5


class ImageFetchError(UsamError):
    """An image could not be fetched (refused host, HTTP error, too large, ...)."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float
    allowed_hosts: tuple[str, ...] = ()
    max_bytes_setting: str = "USAM_MAX_IMAGE_BYTES"


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` is one of ``allowed`` (``*.example.com`` matches subdomains), case-insensitively."""
    host = host.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class GuardedFetcher:
    """Downloads within :class:`FetchLimits`; subclasses name a trusted origin and its headers."""

    def __init__(self, limits: FetchLimits, client: httpx.Client):
        self.limits = limits
        self.client = client

    def fetch_public(self, url: str) -> bytes:
        """Download from any public host (web class images); internal addresses only if allow-listed."""
        if not url.startswith(("http://", "https://")):
            raise ImageFetchError(f"unsupported image URL {redact_url(url)!r}")
        return self._download(url, None, public=True)

    # -- hooks -----------------------------------------------------------------------------------

    def _is_trusted(self, url: str) -> bool:
        """A URL of the service that hands out the references (Label Studio)."""
        return False

    def _trusted_anywhere(self, url: str) -> bool:
        """A trusted URL the operator named (``LABEL_STUDIO_URL``): fetched whatever its address."""
        return False

    def _headers(self, url: str, trusted: bool, basic_auth: tuple[str, str] | None) -> dict[str, str]:
        return {}

    def _renew_credentials(self, url: str, trusted: bool) -> bool:
        """After a 401: renew the credentials and say whether to try once more."""
        return False

    def _http_error(self, url: str, status: int, trusted: bool) -> str:
        return f"{redact_url(url)} answered HTTP {status}"

    # -- the download ------------------------------------------------------------------------------

    def _download(self, url: str, basic_auth: tuple[str, str] | None, *, public: bool) -> bytes:
        deadline = time.monotonic() + self.limits.timeout
        vouched = public
        renewed = False
        for _ in range(MAX_REDIRECTS + 1):
            left = self._time_left(url, deadline)
            trusted = self._is_trusted(url)
            address = self._check_destination(url, trusted=trusted, vouched=vouched)
            headers = self._headers(url, trusted, basic_auth)
            target, extensions = url, {}
            if address is not None:
                target, pinned = pin(url, address)
                headers = {**headers, **pinned}
                extensions = {"sni_hostname": urlsplit(url).hostname or ""}
            try:
                with self.client.stream(
                    "GET", target, headers=headers, timeout=left, extensions=extensions
                ) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        vouched = trusted or public
                        continue
                    if response.status_code == 401 and not renewed and self._renew_credentials(url, trusted):
                        renewed = True
                        continue
                    if response.status_code >= 400:
                        raise ImageFetchError(self._http_error(url, response.status_code, trusted))
                    return self._read(url, response, deadline)
            except httpx.TimeoutException:  # a wait ran out, and with it the time left
                raise ImageFetchError(self._too_slow(url)) from None
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"could not download {redact_url(url)}: {type(exc).__name__} {exc}") from None
        raise ImageFetchError(f"too many redirects fetching {redact_url(url)}")

    def _time_left(self, url: str, deadline: float) -> float:
        """Seconds until ``deadline``; past it, the download fails."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageFetchError(self._too_slow(url))
        return left

    def _check_destination(self, url: str, *, trusted: bool, vouched: bool) -> Address | None:
        """The address to connect to, checked; None for an origin the operator named.

        Trusted (Label Studio): any address but link-local, multicast and reserved ones, unless the
        operator named it. Otherwise the host must be allow-listed, unless the trusted service (or,
        for web class images, the caller) vouches for public hosts; internal addresses only when
        allow-listed, link-local, multicast and reserved ones never."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageFetchError(f"refusing to fetch {redact_url(url)}: only http(s) URLs are fetched")
        if trusted and self._trusted_anywhere(url):
            return None
        host = parts.hostname
        allowed = trusted or host_allowed(host, self.limits.allowed_hosts)
        if not allowed and not vouched:
            raise ImageFetchError(
                f"refusing to fetch {redact_url(url)}: {host} is neither Label Studio's host nor in USAM_ALLOWED_HOSTS"
            )
        addresses = _addresses(host, parts.port or (443 if parts.scheme == "https" else 80))
        for address in addresses:
            plain = _unmapped(address)
            never = plain.is_link_local or plain.is_multicast or plain.is_reserved or plain.is_unspecified
            if never or (not allowed and (plain.is_private or plain.is_loopback)):
                raise ImageFetchError(
                    f"refusing to fetch {redact_url(url)}: {host} resolves to internal address {plain}"
                )
        return addresses[0]

    def _read(self, url: str, response: httpx.Response, deadline: float) -> bytes:
        """The body, checked against the size limit and the deadline after every chunk (each read
        waits at most the time that was left when the hop began)."""
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
            raise ImageFetchError(self._too_large(url, int(declared)))
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.limits.max_bytes:
                raise ImageFetchError(self._too_large(url, len(body)))
            self._time_left(url, deadline)
        return bytes(body)

    def _too_slow(self, url: str) -> str:
        return (
            f"{redact_url(url)} did not finish downloading within USAM_FETCH_TIMEOUT={self.limits.timeout:g} s; "
            "raise it for slow hosts"
        )

    def _too_large(self, url: str, size: int) -> str:
        return (
            f"{redact_url(url)} is over {self.limits.max_bytes:,} bytes ({size:,} seen); raise "
            f"{self.limits.max_bytes_setting} to accept it"
        )


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def pin(url: str, address: Address) -> tuple[str, dict[str, str]]:
    """``url`` with its host replaced by ``address``, and the ``Host`` header naming the original."""
    parts = urlsplit(url)
    netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.port is not None:
        netloc += f":{parts.port}"
    host = parts.hostname or ""
    header = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), {"Host": header}


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def redact_url(url: str, limit: int = 160) -> str:
    """``url`` fit to be shown: scheme, host, port and path, at most ``limit`` characters; the
    query and fragment (presigned signatures, tokens) become ``?…`` and ``user:pass@`` is dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[oops": say nothing of it
        return "(a malformed URL)"
    netloc = parts.netloc.rpartition("@")[2]
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query or parts.fragment:
        shown += "?…"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def check_not_forbidden(url: str) -> None:
    """Refuse a URL whose host resolves to a link-local, multicast, reserved or unspecified address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageFetchError(f"refusing {redact_url(url)}: only http(s) URLs")
    for address in _addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)):
        plain = _unmapped(address)
        if plain.is_link_local or plain.is_multicast or plain.is_reserved or plain.is_unspecified:
            raise ImageFetchError(f"refusing {redact_url(url)}: {parts.hostname} resolves to internal address {plain}")


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addresses(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ImageFetchError(f"cannot resolve image host {host}: {exc}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]
