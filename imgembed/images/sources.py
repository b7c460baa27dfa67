"""Reading an image's bytes: from the database row, a local file (under the allowed roots) or
http(s). Every problem becomes an :class:`ImageError` naming it, so that the image fails alone;
``retryable`` marks problems that may pass (a timeout, a server error)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from imgembed.images.fetch_http import fetch_http
from imgembed.images.image_error import ImageError, Reason
from imgembed.settings import Settings


@dataclass(frozen=True)
class ImageSource:
    content: bytes | None = None
    uri: str | None = None
    # A location a reader gave (search_image_at, request_image_at), not one the application wrote:
    # a file path is read only under IMGEMBED_ALLOWED_ROOTS, and never while it is unset.
    from_reader: bool = False


def read_source(source: ImageSource, settings: Settings) -> bytes:
    if source.content is not None:
        data = bytes(source.content)
        if len(data) > settings.max_image_bytes:
            raise ImageError(
                Reason.TOO_LARGE, f"image is {len(data)} bytes, over the cap of {settings.max_image_bytes} (IMGEMBED_MAX_IMAGE_BYTES)"
            )
        return data
    if not source.uri or not source.uri.strip():
        raise ImageError(Reason.BAD_LOCATION, "the image location is empty")
    uri = source.uri.strip()
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_http(uri, settings)
    if scheme == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(Reason.BAD_LOCATION, f"file:// URI {uri!r} names host {parsed.netloc!r}; only local files are read")
        return read_file(Path(unquote(parsed.path)), settings, from_reader=source.from_reader)
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise ImageError(Reason.BAD_LOCATION, f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file://, http:// or https://)")
    return read_file(Path(uri), settings, from_reader=source.from_reader)


def read_file(path: Path, settings: Settings, *, from_reader: bool = False) -> bytes:
    if not path.is_absolute():
        raise ImageError(Reason.BAD_LOCATION, f"path {str(path)!r} is relative; store absolute paths or file:// URIs")
    if from_reader and not settings.allowed_roots:  # the same answer whether the file exists or not
        raise ImageError(Reason.OUTSIDE_ALLOWED_ROOTS, f"{path}: a path given in a query is read only under "
                                                       "IMGEMBED_ALLOWED_ROOTS, which is not set")
    if settings.allowed_roots:  # resolving costs a system call per path component: only to check
        path = _inside_allowed_roots(path, settings.allowed_roots)
    try:
        # Unbuffered, and read by the file's size: a buffered read of "up to the cap" allocated
        # the whole cap (50 MB by default) for every image, four times the cost of the read.
        with open(path, "rb", buffering=0, opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(Reason.UNREADABLE, f"{path} is not a regular file")
            cap = settings.max_image_bytes
            if info.st_size > cap:
                raise ImageError(Reason.TOO_LARGE, f"{path} is {info.st_size} bytes, over the cap of {cap} (IMGEMBED_MAX_IMAGE_BYTES)")
            return read_to_end(handle, info.st_size, cap, path)
    except FileNotFoundError:
        raise ImageError(Reason.FILE_NOT_FOUND, str(path)) from None
    except PermissionError:
        raise ImageError(Reason.UNREADABLE, f"permission denied reading {path}") from None
    except IsADirectoryError:
        raise ImageError(Reason.UNREADABLE, f"{path} is a directory, not an image file") from None
    except OSError as error:
        raise ImageError(Reason.UNREADABLE, f"cannot read {path}: {error.strerror or error}", retryable=True) from None


def read_to_end(handle: io.RawIOBase, expected_bytes: int, cap: int, path: Path) -> bytes:
    """A file's bytes up to its end. One read(2) may return fewer bytes than asked (network and
    FUSE file systems, signals), so reads go on until one returns nothing. A file that grew past
    ``cap`` since it was measured is refused, never cut short."""
    chunks: list[bytes] = []
    total = 0
    ask = expected_bytes + 1  # the whole file in one read when it did not change, then its end
    while chunk := handle.read(min(ask, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise ImageError(Reason.TOO_LARGE, f"{path} grew past the cap of {cap} bytes while it was read (IMGEMBED_MAX_IMAGE_BYTES)")
        ask = 1 << 20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _inside_allowed_roots(path: Path, roots: Sequence[Path]) -> Path:
    """The path with ``..`` and symbolic links resolved, if it lies under one of ``roots``. A path
    outside them gets the same answer whether it exists or not: nothing outside is looked at
    beyond following the path's own links."""
    outside = ImageError(Reason.OUTSIDE_ALLOWED_ROOTS, f"{path} (IMGEMBED_ALLOWED_ROOTS)")
    if not any(Path(os.path.normpath(path)).is_relative_to(root) for root in roots):
        raise outside
    try:
        resolved = path.resolve(strict=False)  # links followed as far as they exist
    except (OSError, RuntimeError):  # a loop of links
        raise ImageError(Reason.UNREADABLE, f"cannot resolve {path}: a loop of symbolic links") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise outside
    return resolved
