"""The one error a single image can cause: it fails that image alone. Its reason is one of a few
stable classes, which ``imgembed.failure_reasons`` groups by; the detail says which file or URL
and what exactly went wrong."""

from __future__ import annotations


class Reason:
    """The classes of reasons an image fails for (the text before the first colon of its error)."""

    NOT_AN_IMAGE = "not an image"
    CORRUPT_IMAGE = "corrupt image"
    DECOMPRESSION_BOMB = "decompression bomb"
    TOO_LARGE = "too large"
    FILE_NOT_FOUND = "file not found"
    UNREADABLE = "unreadable"
    OUTSIDE_ALLOWED_ROOTS = "outside allowed roots"
    BAD_LOCATION = "bad location"
    HTTP_NOT_ALLOWED = "http not allowed"
    ADDRESS_NOT_ALLOWED = "address not allowed"
    HTTP_ERROR = "http error"


class ImageError(Exception):
    def __init__(self, reason: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.retryable = retryable
