"""The one error a single image can cause: it fails that image alone. Its reason is one of a few
stable classes, which ``imgembed.failure_reasons`` groups by; the detail says which file or URL
and what exactly went wrong."""

from __future__ import annotations

import re

# A Python bytes literal in an exception's message (decoders quote what they found: "b'hunter2'").
_BYTES_LITERAL = re.compile(r"""b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
MAX_DETAIL = 300


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


def plain_words(message: object) -> str:
    """An exception's message, or a server's words, fit for a failure that more roles may read than
    the image it came from: quoted bytes become "<bytes>", anything unprintable "?", and it is cut
    to a few hundred characters. Never a piece of the file."""
    text = _UNPRINTABLE.sub("?", _BYTES_LITERAL.sub("<bytes>", str(message)))
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."
