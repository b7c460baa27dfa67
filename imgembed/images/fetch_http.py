"""Fetching images over http(s), off unless ``IMGEMBED_ALLOW_HTTP=1``.

Guarded against server-side request forgery: a host must resolve only to public addresses (or to
networks named in ``IMGEMBED_HTTP_ALLOW_NETWORKS``, or anywhere with
``IMGEMBED_HTTP_ALLOW_PRIVATE=1``), and the connection goes to the very address that was checked,
so a name that resolves differently a moment later (DNS rebinding) changes nothing. Every redirect
is checked the same way. A byte cap applies, and one deadline covers the whole fetch (every
redirect, connection and read): a server that sends a byte at a time holds a thread no longer.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from imgembed.images.image_error import ImageError, Reason, plain_words
from imgembed.settings import Settings

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
READ_CHUNK = 1 << 16


class _Deadline:
    """When the whole fetch must be over; each step's socket timeout is the time left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, url: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise ImageError(Reason.HTTP_ERROR, f"GET {url} timed out: over {self.seconds:g} s in all "
                                                "(IMGEMBED_HTTP_TIMEOUT_SECONDS)", retryable=True)
        return left


@dataclass(frozen=True)
class CheckedTarget:
    """A URL and the address its host resolved to when it was checked."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> bool:
    return (settings.http_allow_private or address.is_global
            or any(address in network for network in settings.http_allow_networks))


def check_target(url: str, settings: Settings) -> CheckedTarget:
    """The URL's host resolved once; every address it resolves to must be allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(Reason.BAD_LOCATION, f"refusing {url!r}: only http(s) URLs with a host are fetched")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ImageError(Reason.HTTP_ERROR, f"cannot resolve host {parts.hostname!r}: {error}", retryable=True) from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if not _allowed(address, settings):
            raise ImageError(
                Reason.ADDRESS_NOT_ALLOWED, f"refusing {url!r}: host {parts.hostname} resolves to non-public address {address} "
                "(set IMGEMBED_HTTP_ALLOW_NETWORKS or IMGEMBED_HTTP_ALLOW_PRIVATE=1 to allow)"
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CheckedTarget(url, parts.scheme, parts.hostname, port, path, str(addresses[0]))


def _connection(target: CheckedTarget, timeout: float) -> http.client.HTTPConnection:
    """A connection to the checked address that still speaks to the host by name (Host header,
    TLS server name and certificate)."""
    kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = kind(target.host, target.port, timeout=timeout)

    def to_checked_address(address: tuple[str, int], *args: object) -> socket.socket:
        return socket.create_connection((target.address, address[1]), *args)  # type: ignore[arg-type]

    connection._create_connection = to_checked_address  # type: ignore[attr-defined]
    return connection


def _read_capped(response: http.client.HTTPResponse, url: str, cap: int, deadline: _Deadline,
                 connection: http.client.HTTPConnection) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ImageError(Reason.TOO_LARGE, f"{url} is {declared} bytes, over the cap of {cap}")
    chunks: list[bytes] = []
    total = 0
    while True:
        if connection.sock is not None:
            connection.sock.settimeout(deadline.left(url))
        chunk = response.read1(min(READ_CHUNK, cap + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise ImageError(Reason.TOO_LARGE, f"{url} is over the cap of {cap} bytes (IMGEMBED_MAX_IMAGE_BYTES)")
        deadline.left(url)


def _get(target: CheckedTarget, settings: Settings, deadline: _Deadline) -> tuple[str | None, bytes]:
    """(where a redirect points, None) or (None, the body)."""
    connection = _connection(target, deadline.left(target.url))
    try:
        connection.request("GET", target.path, headers={"User-Agent": "imgembed"})
        if connection.sock is not None:
            connection.sock.settimeout(deadline.left(target.url))
        response = connection.getresponse()
        if response.status in REDIRECTS and response.getheader("Location"):
            return urljoin(target.url, response.getheader("Location")), b""
        if response.status >= 400:
            raise ImageError(Reason.HTTP_ERROR, f"GET {target.url} answered HTTP {response.status} "
                                                f"{plain_words(response.reason)}", retryable=response.status >= 500)
        return None, _read_capped(response, target.url, settings.max_image_bytes, deadline, connection)
    except TimeoutError:
        deadline.left(target.url)  # says the deadline passed, when it did
        raise ImageError(Reason.HTTP_ERROR, f"GET {target.url} timed out", retryable=True) from None
    except (OSError, http.client.HTTPException) as error:
        raise ImageError(Reason.HTTP_ERROR, f"GET {target.url} failed: {plain_words(error)}", retryable=True) from None
    finally:
        connection.close()


def fetch_http(url: str, settings: Settings) -> bytes:
    if not settings.allow_http:
        raise ImageError(Reason.HTTP_NOT_ALLOWED, f"http(s) fetching is off, so {url!r} was not read (set IMGEMBED_ALLOW_HTTP=1)")
    deadline = _Deadline(settings.http_timeout_seconds)
    for _ in range(MAX_REDIRECTS + 1):
        redirect, data = _get(check_target(url, settings), settings, deadline)
        if redirect is None:
            return data
        url = redirect
    raise ImageError(Reason.HTTP_ERROR, f"GET {url}: more than {MAX_REDIRECTS} redirects")
