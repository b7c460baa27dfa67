"""Everything ``imgembed up`` runs: services the user did not provide, migrations, and a
dispatcher and a worker as child processes. Stopping it stops all of them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import psycopg

from imgembed import migrate
from imgembed.local.postgres import EmbeddedPostgres
from imgembed.local.redis import PrivateRedis, redis_reachable
from imgembed.local.service import ServiceError
from imgembed.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "imgembed"


def ensure_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            connection.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def prepare_database(settings: Settings) -> None:
    """Migrate to head and register the configured model (default if none is yet)."""
    assert settings.database_url
    migrate.upgrade(settings.database_url, model=settings.model)


def child_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with every setting as the children must see it."""
    return {**os.environ, **settings.as_environment(), "PYTHONUNBUFFERED": "1"}


@dataclass
class Stack:
    settings: Settings
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, role: str, *extra: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "imgembed", role, *extra], env=child_environment(self.settings)
        )
        self.children[role] = process
        return process

    def exited(self) -> list[str]:
        return [f"{role} (exit {child.returncode})" for role, child in self.children.items() if child.poll() is not None]

    def stop_children(self, timeout: float = 20.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for role, child in self.children.items():
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", role, timeout)
                child.kill()
                child.wait()


@contextmanager
def local_stack(settings: Settings, *, durable: bool = True) -> Iterator[Stack]:
    """Start what is missing, migrate, run a dispatcher and a worker; undo it all on exit."""
    with ExitStack() as cleanup:
        if not settings.database_url:
            postgres = EmbeddedPostgres(settings.data_dir / "postgres", durable=durable,
                                        shared_buffers_mb=settings.pg_shared_buffers_mb)
            server_url = postgres.start()
            cleanup.callback(postgres.stop)
            ensure_database(server_url, EMBEDDED_DATABASE)
            settings = settings.with_overrides(database_url=postgres.url(EMBEDDED_DATABASE))
        if settings.redis_url:
            if not redis_reachable(settings.redis_url):
                raise ServiceError(f"REDIS_URL={settings.redis_url} does not answer PING")
        else:
            redis = PrivateRedis(settings.data_dir / "redis")
            settings = settings.with_overrides(redis_url=redis.start())
            cleanup.callback(redis.stop)
        prepare_database(settings)
        stack = Stack(settings)
        cleanup.callback(stack.stop_children)
        stack.spawn("dispatch")
        stack.spawn("worker")
        yield stack
