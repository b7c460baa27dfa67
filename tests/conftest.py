"""Shared fixtures: one embedded PostgreSQL (pgvector) per session with a migrated template
database, a fresh database per test cloned from it, Redis (REDIS_URL if it answers, else a
private redis-server), and real dispatcher / Celery worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psycopg
import pytest

from imgembed import migrate
from imgembed.db import connect
from imgembed.local.postgres import EmbeddedPostgres, postgres_bin_dir
from imgembed.local.redis import PrivateRedis, redis_reachable

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
TEST_MODEL = "imgembed-tiny"
TEMPLATE_DATABASE = "imgembed_template"
_OWN_BASETEMP = pytest.StashKey[Path]()
_MODEL_DIR = pytest.StashKey[Path]()


def _head_revision() -> str:
    """imgembed's newest migration, as Alembic's script directory says."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused/unused")).get_current_head()
    assert head is not None
    return head


HEAD_REVISION = _head_revision()


def wait_for(predicate: Callable[[], object], timeout: float, message: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {message}")
        time.sleep(interval)


_SERVERS: dict[int, EmbeddedPostgres] = {}  # the embedded servers of this session, by port


def pytest_configure(config: pytest.Config) -> None:
    """As root, each session's temporary folders go in a folder of its own: the embedded servers
    then run as their own system user, and pytest makes /tmp/pytest-of-root private at each session
    start, which would cut another session's running servers off from their files."""
    if config.option.basetemp is None and os.geteuid() == 0:
        config.option.basetemp = tempfile.mkdtemp(prefix="imgembed-tests-")
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)
    # Every process the tests start keeps its models and exports in a folder of this session's own,
    # never in the user's: what earlier runs left there changes no verdict and no duration.
    os.environ["IMGEMBED_MODEL_DIR"] = tempfile.mkdtemp(prefix="imgembed-test-models-")
    config.stash[_MODEL_DIR] = Path(os.environ["IMGEMBED_MODEL_DIR"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's own temporary folder goes when every test passed; kept for a look otherwise."""
    folder = session.config.stash.get(_OWN_BASETEMP, None)
    if folder is not None and exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(session.config.stash.get(_MODEL_DIR, ""), ignore_errors=True)


def as_role(database_url: str, role: str) -> str:
    """The same database for another role: through the embedded server's Unix socket, where no
    password is asked (over TCP every login needs one)."""
    parts = urlsplit(database_url)
    return _SERVERS[parts.port].socket_url(parts.path.lstrip("/"), role)  # type: ignore[index]


def schema_dump(url: str, *options: str) -> str:
    """``pg_dump --schema-only`` of the database, without its comments and the random key that
    guards each dump script."""
    dump = subprocess.run([str(postgres_bin_dir() / "pg_dump"), "--schema-only", "--no-owner", *options, url],
                          check=True, capture_output=True, text=True, timeout=120).stdout
    return "\n".join(line for line in dump.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


def comparable_dump(url: str, *options: str) -> str:
    """The schema dump, with the database's own loopback role (named after it) given one name, so
    that two databases' dumps compare."""
    with psycopg.connect(url) as connection:
        text_role = connection.execute("SELECT imgembed._text_request_role()").fetchone()[0]
    return schema_dump(url, *options).replace(text_role, "imgembed_text_DATABASE")


def storage_of(db: psycopg.Connection, table: str) -> str:
    return db.execute("SELECT imgembed.storage_table(%s)", (table,)).fetchone()[0]


def knn_votes(db: psycopg.Connection, table: str, key: object, key_column: str, label_column: str,
              k: int = 5) -> dict[str, int]:
    """The votes knn_label should give a row, computed here: the labels of its k nearest labelled
    rows (cosine distance, the row itself left out) among the stored vectors the connection reads."""
    vectors = {key_: np.asarray(vector, dtype=np.float64) for key_, vector in db.execute(
        f"SELECT id::text, embedding::real[] FROM {storage_of(db, table)}")}
    labels = dict(db.execute(f"SELECT {key_column}::text, {label_column}::text FROM {table} "
                             f"WHERE {label_column} IS NOT NULL").fetchall())
    target = vectors[str(key)]

    def distance(other: str) -> float:
        return 1 - float(vectors[other] @ target) / float(np.linalg.norm(vectors[other]) * np.linalg.norm(target))

    nearest = sorted((other for other in labels if other != str(key) and other in vectors),
                     key=lambda other: (distance(other), other))[:k]
    return dict(Counter(labels[other] for other in nearest))


def knn_label_votes(db: psycopg.Connection, table: str, key: str, k: int = 5) -> dict[str, int]:
    """What knn_label answers (exactly, no index), as label -> votes; ``key`` is SQL, e.g. '3::bigint'."""
    return {label: votes for label, votes, _ in db.execute(
        f"SELECT * FROM imgembed.knn_label('{table}', {key}, {k}, exact => true)").fetchall()}


@pytest.fixture(scope="session")
def test_model_exported() -> None:
    """The test model's towers exported to ONNX (float32 and int8) once, into the session's model
    folder, before any worker starts: no test's first image or text waits on an export."""
    subprocess.run([sys.executable, "-m", "imgembed", "models", "export", TEST_MODEL, "--int8"], env=os.environ,
                   cwd=REPO, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory, test_model_exported: None) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False)
    server.start()
    _SERVERS[server.port] = server  # type: ignore[index]
    yield server
    server.stop(mode="immediate")


@pytest.fixture(scope="session")
def template_database(pg_server: EmbeddedPostgres) -> str:
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DATABASE}")
        admin.execute(f"CREATE DATABASE {TEMPLATE_DATABASE}")
    url = pg_server.url(TEMPLATE_DATABASE)
    migrate.upgrade(url, model=TEST_MODEL)
    return TEMPLATE_DATABASE


@pytest.fixture
def fresh_database(pg_server: EmbeddedPostgres) -> Iterator[Callable[[str | None], str]]:
    """Factory: a new empty database, or a clone of a template; dropped after the test."""
    created: list[str] = []

    def make(template: str | None = None) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        created.append(name)
        return pg_server.url(name)

    yield make
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        for name in created:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(fresh_database: Callable[[str | None], str], template_database: str) -> str:
    """A migrated database with the test model registered as default."""
    return fresh_database(template_database)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with connect(database_url) as connection:
        yield connection


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("REDIS_URL")
    if configured and redis_reachable(configured):
        yield configured
        return
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@dataclass
class Services:
    """Real imgembed processes (dispatchers, Celery workers) for one test database."""

    database_url: str
    redis_url: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    queue: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            IMGEMBED_MODEL=TEST_MODEL,
            IMGEMBED_QUEUE=self.queue,
            IMGEMBED_DEVICE="cpu",
            IMGEMBED_SWEEP_SECONDS="0.5",
            IMGEMBED_RETRY_BACKOFF_SECONDS="0.5",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, role: str) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{role}-{len(self.processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "imgembed", role],
            env=self.env(),
            cwd=REPO,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        process.log_path = log_path  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            self.stop(process)

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.log_path.name} ---\n{process.log_path.read_text(errors='replace')[-4000:]}"  # type: ignore[attr-defined]
            for process in self.processes
        )


@pytest.fixture
def services(database_url: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Services]:
    running = Services(database_url, redis_url, tmp_path)
    yield running
    running.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(running.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
