"""The one error a single image can cause: it fails that image alone."""

from __future__ import annotations


class ImageError(Exception):
    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
