"""What the local services share: their error, free ports and listening checks."""

from __future__ import annotations

import socket

from imgembed.errors import ImgembedError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ServiceError(ImgembedError, RuntimeError):
    """A local service could not be started."""
