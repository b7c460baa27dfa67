"""Workers on ONNX Runtime (IMGEMBED_RUNTIME): the same pixels, tokens and vectors as PyTorch, the
same search results through the whole pipeline, and a worker process that never loads PyTorch."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import psycopg
import pytest

from imgembed.db import as_array
from imgembed.images.decode import decode_image
from imgembed.models.names import parse_model_spec
from imgembed.settings import load_settings
from imgembed.training.synthetic import random_shapes
from imgembed.worker.onnx.int8_weights import int8_weight_bits
from imgembed.worker.onnx.model import load_onnx_model
from imgembed.worker.pytorch.embedding import load_model
from tests.conftest import REPO, TESTDATA, Services, wait_for

PHOTOS = sorted((TESTDATA / "photos").glob("*.JPEG"))[:24]
TEXTS = ["a photo of a dog", "a red circle on white", "Two BLUE squares!", "ünïcødé ✓ café", "x" * 300, ""]
AGREEMENT = 0.9999


def _pictures(input_size: int) -> list[object]:
    settings = load_settings({})
    return ([decode_image(path.read_bytes(), settings, target_size=input_size) for path in PHOTOS]
            + [decode_image(shape.png_bytes(), settings, target_size=input_size) for shape in random_shapes(8, seed=3)])


@pytest.mark.parametrize("name", ["imgembed-tiny", "imgembed-shapes"])
def test_onnx_and_pytorch_give_the_same_vectors(name: str) -> None:
    settings = load_settings({})  # the model directory the test workers use: the export is made once
    spec = parse_model_spec(name)
    reference = load_model(spec, "cpu")
    image_tower, text_tower = load_onnx_model(spec, "image", settings), load_onnx_model(spec, "text", settings)
    pictures = _pictures(reference.input_size)
    for picture in pictures:  # the torch-free transform gives the transform's pixels
        np.testing.assert_allclose(image_tower.prepare(picture), reference.preprocess(picture).numpy(), atol=1e-6)
    ours = image_tower.embed_images([image_tower.prepare(picture) for picture in pictures])
    theirs = reference.embed_images([reference.prepare(picture) for picture in pictures])
    assert (ours * theirs).sum(axis=1).min() >= AGREEMENT
    texts = text_tower.embed_texts(TEXTS)
    assert (texts * reference.embed_texts(TEXTS)).sum(axis=1).min() >= AGREEMENT
    assert ours.dtype == texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_exported_ahead_with_int8_weights(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """`imgembed models export --int8` fills the model directory ahead of the workers; with
    IMGEMBED_ONNX_QUANTIZE=int8 they run the quantised copy this CPU suits (8-bit weights, or 7-bit
    on x86 without VNNI), close to the float one; the patch convolution stays float32."""
    exported = subprocess.run([sys.executable, "-m", "imgembed", "models", "export", "imgembed-shapes", "--tower", "image",
                               "--int8"], env={**os.environ, "IMGEMBED_MODEL_DIR": str(tmp_path)}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "agreement with PyTorch" in exported.stdout and "int8 7-bit agreement" in exported.stdout, exported.stdout
    (manifest_file,) = (tmp_path / "onnx" / "imgembed-shapes").glob("*/image.json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["agreement"] >= AGREEMENT and sorted(manifest["int8"]) == ["7", "8"]
    settings = load_settings({"IMGEMBED_MODEL_DIR": str(tmp_path), "IMGEMBED_ONNX_QUANTIZE": "int8"})
    spec = parse_model_spec("imgembed-shapes")
    exact = load_onnx_model(spec, "image", settings.with_overrides(onnx_quantize="none"))
    assert exact.int8_bits is None and load_onnx_model(spec, "image", settings).int8_bits == int8_weight_bits()
    pictures = [exact.prepare(picture) for picture in _pictures(exact.input_size)]
    reference = exact.embed_images(pictures)
    for bits in (8, 7):
        quantized = load_onnx_model(spec, "image", settings, int8_bits=bits)
        graph = onnx.load(str(manifest_file.parent / manifest["int8"][str(bits)]["file"]), load_external_data=False)
        operators = {node.op_type for node in graph.graph.node}
        assert {"MatMulInteger", "Conv"} <= operators and "ConvInteger" not in operators
        assert (quantized.embed_images(pictures) * reference).sum(axis=1).mean() >= 0.999
    assert "agree with PyTorch's only" not in caplog.text
    manifest["int8"]["7"]["agreement"] = 0.98  # as a model whose activations int8 cannot hold would give
    manifest_file.write_text(json.dumps(manifest))
    load_onnx_model(spec, "image", settings, int8_bits=7)
    assert "int8 weights agree with PyTorch's only to cosine 0.9800" in caplog.text


WORKER_REPORTING_ITS_MODULES = (  # written past Celery, which takes over sys.stdout
    "import atexit, os, runpy, sys\n"
    "atexit.register(lambda: os.write(1, f'torch loaded: {\"torch\" in sys.modules}\\n'.encode()))\n"
    "sys.argv = ['imgembed', 'worker']\n"
    "runpy.run_module('imgembed', run_name='__main__')\n")


def _photos_through_an_onnx_worker(db: psycopg.Connection, services: Services,
                                   **settings: str) -> tuple[str, np.ndarray, np.ndarray, float]:
    """A real worker on ONNX Runtime (with ``settings`` besides) embeds the photos and answers a
    text query; returns its log, the stored vectors, PyTorch's vectors of the same photos, and the
    cosine between the worker's vector of the text and PyTorch's."""
    db.execute("CREATE TABLE shots (id bigint PRIMARY KEY, photo bytea)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO shots VALUES (%s, %s)", [(i, path.read_bytes()) for i, path in enumerate(PHOTOS)])
    db.execute("SELECT imgembed.watch('shots', 'photo')")
    services.extra_env.update(IMGEMBED_RUNTIME="onnx", **settings)
    services.start("dispatch")
    log_path = services.log_dir / "onnx-worker.log"
    worker = subprocess.Popen([sys.executable, "-c", WORKER_REPORTING_ITS_MODULES], env=services.env(), cwd=REPO,
                              stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    worker.log_path = log_path  # type: ignore[attr-defined]
    services.processes.append(worker)
    wait_for(lambda: db.execute("SELECT embedded = %s FROM imgembed.status WHERE table_name = 'public.shots'",
                                (len(PHOTOS),)).fetchone() == (True,), 180, "the photos embedded")
    found = db.execute("SELECT id FROM imgembed.search_text('shots', NULL::bigint, 'a photo of a bird', 5, "
                       "timeout_seconds => 300)").fetchall()
    assert len(found) == 5
    services.stop(worker)
    log = log_path.read_text()

    reference = load_model(parse_model_spec("imgembed-tiny"), "cpu")
    expected = reference.embed_images([reference.prepare(decode_image(path.read_bytes(), load_settings({}),
                                                                      target_size=reference.input_size))
                                       for path in PHOTOS])
    storage = db.execute("SELECT imgembed.storage_table('shots')").fetchone()[0]
    stored = dict(db.execute(f"SELECT id, embedding FROM {storage}").fetchall())
    # The text the worker embedded, against PyTorch's embedding of it: their cosine.
    text_vector = as_array(db.execute("SELECT imgembed.text_vector('a photo of a bird', 'imgembed-tiny', 0)").fetchone()[0])
    (text_expected,) = reference.embed_texts(["a photo of a bird"])
    text_cosine = float(text_vector @ text_expected / np.linalg.norm(text_vector) / np.linalg.norm(text_expected))
    return log, np.stack([as_array(stored[i]) for i in range(len(PHOTOS))]), expected, text_cosine


def test_a_worker_on_onnx_runtime(db: psycopg.Connection, services: Services) -> None:
    """A real worker with IMGEMBED_RUNTIME=onnx embeds photos and a text query without ever
    importing torch; its vectors are PyTorch's (cosine >= 0.9999) and similar() answers as PyTorch's
    vectors would."""
    log, vectors, expected, text_cosine = _photos_through_an_onnx_worker(db, services)
    assert "torch loaded: False" in log, log[-3000:]
    assert (vectors * expected).sum(axis=1).min() >= AGREEMENT and text_cosine >= AGREEMENT
    for query in range(0, len(PHOTOS), 5):
        order = [int(i) for i in np.argsort(-(expected @ expected[query])) if i != query][:5]
        answered = [row[0] for row in db.execute("SELECT id FROM imgembed.similar('shots', %s::bigint, 5)",
                                                 (query,)).fetchall()]
        assert answered == order


def test_a_worker_on_int8_weights(db: psycopg.Connection, services: Services) -> None:
    """With IMGEMBED_ONNX_QUANTIZE=int8 a real worker runs both towers on the int8 weights its CPU
    suits, still without torch, and its vectors stay close to PyTorch's float32 ones."""
    log, vectors, expected, text_cosine = _photos_through_an_onnx_worker(db, services, IMGEMBED_ONNX_QUANTIZE="int8")
    assert "torch loaded: False" in log, log[-3000:]
    bits = int8_weight_bits()
    for tower in ("image", "text"):
        assert f"({tower} tower) on ONNX Runtime, int8 ({bits}-bit weights)" in log, log[-3000:]
    assert (vectors * expected).sum(axis=1).mean() >= 0.999
    assert text_cosine >= 0.995, text_cosine  # under this, the worker itself warns that int8 agrees poorly


LOAD_TOWER = (
    "import json, logging, sys\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "from imgembed.models.names import parse_model_spec\n"
    "from imgembed.settings import load_settings\n"
    "from imgembed.worker.onnx.model import load_onnx_model\n"
    "model = load_onnx_model(parse_model_spec('imgembed-shapes'), 'text', load_settings())\n"
    "print(json.dumps(model.embed_texts(['a red circle']).tolist()))\n")


def test_workers_starting_together_export_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two processes that need the same tower of a model the model directory does not hold yet: one
    exports it, the other waits for it; both run the same files, and no temporary file is left."""
    environment = {**os.environ, "IMGEMBED_MODEL_DIR": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", LOAD_TOWER], env=environment, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [error[-2000:] for _, error in outputs]
    assert outputs[0][0] == outputs[1][0]
    exported = sorted(path.name for path in (tmp_path / "onnx" / "imgembed-shapes").glob("*/*"))
    assert exported == [".lock", "bpe_simple_vocab_16e6.txt.gz", "text.json", "text.onnx", "text.onnx.data"]
    logs = "".join(error for _, error in outputs)
    assert logs.count("exporting its text tower to ONNX") == 1, logs[-3000:]


def test_prune_exports_removes_only_what_no_model_maps_to(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`imgembed models prune-exports` removes export folders left by an older export format or a
    replaced checkpoint, and keeps the current one, an export under way, and a folder whose lock
    another process holds."""
    env = {**os.environ, "IMGEMBED_MODEL_DIR": str(tmp_path)}

    def prune(*options: str) -> str:
        finished = subprocess.run([sys.executable, "-m", "imgembed", "models", "prune-exports", *options], env=env,
                                  cwd=REPO, capture_output=True, text=True, timeout=120)
        assert finished.returncode == 0, finished.stderr[-2000:]
        return finished.stdout

    assert "no stale ONNX exports" in prune()
    exported = subprocess.run([sys.executable, "-m", "imgembed", "models", "export", "imgembed-tiny", "--tower", "image"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    (current,) = (tmp_path / "onnx" / "imgembed-tiny").iterdir()
    older, locked = current.with_name("0" * 20), current.with_name("1" * 20)  # as an older format would have named it
    shutil.copytree(current, older)
    shutil.copytree(current, locked)
    under_way = current.with_name("2" * 20)
    under_way.mkdir()
    (under_way / ".lock").touch()
    listed = prune("--dry-run")  # the copies name imgembed-tiny, which maps to the current folder only
    assert f"would remove {older}" in listed and f"would remove {locked}" in listed and str(current) not in listed
    assert older.is_dir() and locked.is_dir()
    with (locked / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a worker exporting into it
        said = prune()
    assert f"removed {older}" in said and f"left {locked}" in said and "freed" in said
    assert not older.exists() and locked.is_dir() and current.is_dir() and under_way.is_dir()
    assert f"removed {locked}" in prune()
    written = (current / "image.onnx").stat().st_mtime_ns
    model = load_onnx_model(parse_model_spec("imgembed-tiny"), "image", load_settings({"IMGEMBED_MODEL_DIR": str(tmp_path)}))
    assert model.dim > 0 and (current / "image.onnx").stat().st_mtime_ns == written  # loaded, not exported again
