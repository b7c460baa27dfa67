"""Fetching images over http(s), off unless ``IMGEMBED_ALLOW_HTTP=1``.

Guarded against server-side request forgery: every host (redirects included) must resolve to
public addresses unless ``IMGEMBED_HTTP_ALLOW_PRIVATE=1``; a timeout and a byte cap apply.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from imgembed.settings import Settings
from imgembed.worker.image_error import ImageError


def _check_host(url: str, settings: Settings) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImageError(f"refusing {url!r}: only http(s) URLs with a host are fetched")
    if settings.http_allow_private:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
    except socket.gaierror as error:
        raise ImageError(f"cannot resolve host {parsed.hostname!r}: {error}", retryable=True) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ImageError(
                f"refusing {url!r}: host {parsed.hostname} resolves to non-public address {address} "
                "(set IMGEMBED_HTTP_ALLOW_PRIVATE=1 to allow)"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        _check_host(newurl, self.settings)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_http(url: str, settings: Settings) -> bytes:
    if not settings.allow_http:
        raise ImageError(f"http(s) fetching is off, so {url!r} was not read (set IMGEMBED_ALLOW_HTTP=1)")
    _check_host(url, settings)
    opener = urllib.request.build_opener(_CheckedRedirects(settings))
    opener.addheaders = [("User-Agent", "imgembed")]
    try:
        with opener.open(url, timeout=settings.http_timeout_seconds) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise ImageError(f"{url} is {declared} bytes, over the cap of {settings.max_image_bytes}")
            data = response.read(settings.max_image_bytes + 1)
    except urllib.error.HTTPError as error:
        raise ImageError(f"GET {url} answered HTTP {error.code} {error.reason}", retryable=error.code >= 500) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ImageError(f"GET {url} failed: {reason}", retryable=True) from None
    if len(data) > settings.max_image_bytes:
        raise ImageError(f"{url} is over the cap of {settings.max_image_bytes} bytes (IMGEMBED_MAX_IMAGE_BYTES)")
    return data
