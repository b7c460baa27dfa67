"""Outages cost latency, never a row: a model that cannot be loaded makes its rows wait, says why,
and embeds them once it loads, with no retry command."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from imgembed.errors import ImgembedError
from imgembed.local.service import free_port
from imgembed.models.names import bundled_weights_dir
from imgembed.models.registry import register_model, wait_for_backfill
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, Services, wait_for

ROWS = 200


def counts(db: psycopg.Connection) -> tuple[int, int, int]:
    """(embedded, waiting: pending or in flight, failed) of the table `parts`."""
    return db.execute("SELECT embedded, pending + in_flight, failed FROM imgembed.status "
                      "WHERE table_name = 'public.parts'").fetchone()


def test_rows_wait_for_a_model_whose_checkpoint_is_missing(db: psycopg.Connection, services: Services,
                                                            tmp_path: Path) -> None:
    checkpoint = tmp_path / "models" / "shapes.pt"
    model = f"imgembed-shapes:{checkpoint}"
    register_model(db, model)
    db.execute("CREATE TABLE parts (id bigint PRIMARY KEY, image bytea)")
    db.execute("SELECT imgembed.watch('parts', 'image', model => %s)", (model,))
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO parts VALUES (%s, %s)",
                           [(i, shape.png_bytes()) for i, shape in enumerate(random_shapes(ROWS, seed=21))])
    # A model directory of its own: the ONNX export of a checkpoint named after this test's folder
    # would otherwise stay in the shared one.
    services.extra_env.update(IMGEMBED_MODEL_RETRY_MAX_SECONDS="2", IMGEMBED_MAX_ATTEMPTS="2",
                              IMGEMBED_MODEL_DIR=str(tmp_path / "model-dir"))
    services.start("dispatch")
    worker = services.start("worker")

    def tries() -> int:
        return worker.log_path.read_text(errors="replace").count(f"model {model} unavailable")  # type: ignore[attr-defined]

    # More tries than IMGEMBED_MAX_ATTEMPTS, and not one row failed: the model is not the rows' fault.
    wait_for(lambda: tries() >= 4, 120, "the worker trying to load the model several times")
    assert counts(db) == (0, ROWS, 0)
    assert db.execute("SELECT max(attempts) FROM imgembed.job").fetchone()[0] <= 1
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.unavailable_models").fetchone()[0] == 1, 30,
             "the worker's heartbeat saying which model it cannot load")
    name, reason, since = db.execute("SELECT model, reason, since FROM imgembed.unavailable_models").fetchone()
    assert name == model and "does not exist" in reason and since is not None
    status = subprocess.run([sys.executable, "-m", "imgembed", "status"], cwd=REPO, env=services.env(),
                            capture_output=True, text=True, timeout=60)
    assert "Models unavailable" in status.stdout and "does not exist" in status.stdout, status.stdout
    # Waiting on its backfill (`imgembed models add --wait`) ends at once, with the workers' reason.
    with pytest.raises(ImgembedError, match=f"the workers cannot load {re.escape(model)}: .*does not exist"):
        wait_for_backfill(db, model, ["public.parts"], timeout=120)

    # The file arrives: every row is embedded, with no retry command.
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(bundled_weights_dir() / "imgembed-shapes.pt", checkpoint)
    wait_for(lambda: counts(db) == (ROWS, 0, 0), 180, f"all {ROWS} rows embedded once the model loads")
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.unavailable_models").fetchone()[0] == 0, 30,
             "the outage cleared from the heartbeat")


class FakeHub(http.server.ThreadingHTTPServer):
    """Stands where the model hub is (HF_ENDPOINT): serves ``files`` (path -> bytes) the way the
    hub does, answers 404 to everything else, and records every request."""

    def __init__(self) -> None:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, with_body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                body = hub.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802
                self.answer(False)

            def do_GET(self) -> None:  # noqa: N802
                self.answer(True)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    served = FakeHub()
    yield served
    served.shutdown()


# A small OpenCLIP architecture whose tag OpenCLIP downloads from the hub (timm/PE-Core-T-16-384).
PULLED_MODEL, IMPORTED_MODEL = "PE-Core-T-16-384:meta", "PE-Core-T-16-384:tuned-here"
HUB_FILE = "/timm/PE-Core-T-16-384/resolve/main/open_clip_model.safetensors"


def test_pull_and_import_fill_a_model_directory_that_workers_use_without_the_network(
        db: psycopg.Connection, services: Services, tmp_path: Path, hub: FakeHub) -> None:
    """Weights made here are pulled from a hub (a local one that serves them as the hub does) and
    imported from a file into a model directory; workers with that directory load both models by
    their ARCH:TAG names and never ask the hub for anything."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        made_here = open_clip.create_model(PULLED_MODEL.split(":")[0], pretrained=None)
    checkpoint = tmp_path / "open_clip_model.safetensors"
    save_file({name: tensor.half() if tensor.is_floating_point() else tensor
               for name, tensor in made_here.state_dict().items()}, checkpoint)
    hub.files[HUB_FILE] = checkpoint.read_bytes()
    model_dir = tmp_path / "models"
    # PyTorch: two exports of a 384-pixel model to ONNX would double this test's time, and the ONNX
    # path's use of the model directory is tested in test_onnx_runtime.py.
    services.extra_env.update(IMGEMBED_MODEL_DIR=str(model_dir), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"),
                              IMGEMBED_RUNTIME="torch")

    def imgembed(*arguments: str) -> str:
        result = subprocess.run([sys.executable, "-m", "imgembed", *arguments], cwd=REPO, env=services.env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    imgembed("models", "pull", PULLED_MODEL)
    imgembed("models", "import", str(checkpoint), "--name", IMPORTED_MODEL)
    assert HUB_FILE in " ".join(hub.requests)
    for tag in ("meta", "tuned-here"):
        stored = model_dir / "PE-Core-T-16-384" / tag / "open_clip_model.safetensors"
        assert stored.read_bytes() == checkpoint.read_bytes() and (stored.parent / "imgembed.json").is_file()

    hub.files.clear()
    hub.requests.clear()
    for number, model in enumerate((PULLED_MODEL, IMPORTED_MODEL)):
        register_model(db, model, model_dir=model_dir)
        db.execute(f"CREATE TABLE offline_{number} (id bigint PRIMARY KEY, image bytea)")
        db.execute(f"SELECT imgembed.watch('offline_{number}', 'image', model => %s)", (model,))
        with db.cursor() as cursor:
            cursor.executemany(f"INSERT INTO offline_{number} VALUES (%s, %s)",
                               [(i, shape.png_bytes()) for i, shape in enumerate(random_shapes(4, seed=8))])
    assert db.execute("SELECT count(*) FROM imgembed.model WHERE name LIKE 'PE-Core%%' AND sha256 IS NOT NULL"
                      ).fetchone()[0] == 2
    services.start("dispatch")
    worker = services.start("worker")
    wait_for(lambda: db.execute("SELECT sum(embedded) FROM imgembed.status WHERE table_name LIKE 'public.offline_%%'"
                                ).fetchone()[0] == 8, 180, "the rows embedded with the models from the directory")
    assert hub.requests == []
    assert "unavailable" not in worker.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def test_pull_without_the_hub_says_so_in_one_line(services: Services, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    environment = {**services.env(), "IMGEMBED_MODEL_DIR": str(tmp_path / "models"), "HF_ENDPOINT": closed}
    pulled = subprocess.run([sys.executable, "-m", "imgembed", "models", "pull", "ViT-B-32:laion2b_s34b_b79k"],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 1
    assert pulled.stderr.strip().count("\n") == 0, pulled.stderr
    assert "cannot download ViT-B-32:laion2b_s34b_b79k" in pulled.stderr and "cannot be reached" in pulled.stderr
    refused = subprocess.run([sys.executable, "-m", "imgembed", "models", "pull", "ViT-B-32:no-such-tag"],
                             cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "knows no tag 'no-such-tag'" in refused.stderr
