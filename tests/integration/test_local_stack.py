"""`imgembed up` as a user runs it: everything started from one data folder, found there by the
other commands while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from imgembed.local.redis import redis_reachable
from imgembed.local.service import free_port
from tests.conftest import REPO, TEST_MODEL, wait_for


def test_commands_find_the_stack_that_up_started(tmp_path: Path) -> None:
    environment = {name: value for name, value in os.environ.items() if name not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(IMGEMBED_DATA_DIR=str(tmp_path / "data"), IMGEMBED_MODEL=TEST_MODEL,
                       IMGEMBED_PG_SHARED_BUFFERS_MB="128", PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgembed", "status"], cwd=REPO, env=environment,
                              capture_output=True, text=True, timeout=60)

    with log.open("w") as output:
        up = subprocess.Popen([sys.executable, "-m", "imgembed", "up"], cwd=REPO, env=environment, stdout=output,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "imgembed is up" in log.read_text(), 180, "`imgembed up` to start everything")
        found = status()
        assert found.returncode == 0, found.stderr
        assert "imgembed.image" in found.stdout and TEST_MODEL in found.stdout
        prompt = subprocess.run([sys.executable, "-m", "imgembed", "psql", "-A", "-t", "-c",
                                 "SELECT name FROM imgembed.model"], cwd=REPO, env=environment,
                                capture_output=True, text=True, timeout=60)
        assert prompt.returncode == 0 and prompt.stdout.split() == [TEST_MODEL], prompt.stderr
        record = tmp_path / "data" / "running-stack.json"
        assert record.stat().st_mode & 0o077 == 0  # its owner's alone: it holds the passwords
        urls = json.loads(record.read_text())
        database, broker = urlsplit(urls["database_url"]), urlsplit(urls["redis_url"])
        assert database.hostname == "127.0.0.1" and database.password and broker.password
        with psycopg.connect(urls["database_url"]) as connection:  # with its password: in
            assert connection.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password"):  # without: refused
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{database.port}/imgembed", connect_timeout=10)
        assert redis_reachable(urls["redis_url"]) and not redis_reachable(f"redis://127.0.0.1:{broker.port}/0")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert up.returncode == 0, log.read_text()[-3000:]
    gone = status()
    assert gone.returncode == 2 and "DATABASE_URL is not set" in gone.stderr


def test_up_says_in_one_line_that_the_model_cannot_be_had(tmp_path: Path) -> None:
    """On a host that cannot download the default model: one line saying so and what to do, before
    anything starts; no page of download retries."""
    closed = f"http://127.0.0.1:{free_port()}"  # where the model hub would be: nothing listens
    environment = {name: value for name, value in os.environ.items() if name not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(IMGEMBED_DATA_DIR=str(tmp_path / "data"), IMGEMBED_MODEL="ViT-B-32:laion2b_s34b_b79k",
                       HF_ENDPOINT=closed, IMGEMBED_PG_SHARED_BUFFERS_MB="128", PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"
    with log.open("w") as output:
        up = subprocess.Popen([sys.executable, "-m", "imgembed", "up"], cwd=REPO, env=environment, stdout=output,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "imgembed is up" in log.read_text(), 180, "`imgembed up` to start everything")
        wait_for(lambda: "model ViT-B-32:laion2b_s34b_b79k unavailable" in log.read_text(), 120,
                 "the worker's own line about the model")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("imgembed up: ")]
    assert len(said) == 1 and "imgembed models pull ViT-B-32:laion2b_s34b_b79k" in said[0], text[-3000:]
    assert text.index(said[0]) < text.index("imgembed is up")
    assert "Retrying" not in text and "Traceback" not in text, text[-3000:]

    # Started again with a model it has: the tables keep theirs, and up says how to move each.
    environment["IMGEMBED_MODEL"] = TEST_MODEL
    again = tmp_path / "up-again.log"
    with again.open("w") as output:
        up = subprocess.Popen([sys.executable, "-m", "imgembed", "up"], cwd=REPO, env=environment, stdout=output,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "imgembed is up" in again.read_text(), 180, "`imgembed up` to start again")
        wait_for(lambda: "keeps its model" in again.read_text(), 30, "the advice on the tables' model")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert (f"imgembed.image keeps its model ViT-B-32:laion2b_s34b_b79k; to move it to {TEST_MODEL}: imgembed models "
            f"add {TEST_MODEL} --table imgembed.image --wait, then imgembed models use imgembed.image {TEST_MODEL}"
            ) in again.read_text()


def test_a_data_folder_too_deep_for_a_socket(tmp_path: Path) -> None:
    """A Unix socket's path holds 107 bytes: a deep data folder gets its socket in a private folder
    of the temporary folder, and both ways in work."""
    import stat

    from imgembed.local.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / ("deep-" * 20), durable=False)
    assert server.socket_dir != server.pgdata and len(str(server.socket_dir)) < 60
    server.start()
    try:
        for url in (server.url(), server.socket_url()):
            with psycopg.connect(url) as connection:
                assert connection.execute("SELECT 1").fetchone() == (1,)
        assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
    finally:
        server.stop(mode="immediate")
