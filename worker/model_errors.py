"""Why a model cannot serve its jobs here. Never the fault of a row: its jobs wait for the model."""

from __future__ import annotations

from imgembed.errors import ImgembedError


class ModelLoadError(ImgembedError, RuntimeError):
    """The model named by a job cannot be loaded here (missing weights, unknown architecture, no
    room on the device...)."""


class ModelUnavailable(ModelLoadError):
    """A model that failed to load, not tried again before ``retry_in`` seconds."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in
