"""Unit tests of pure code: settings, model names, decoding, the report table. No services."""

from __future__ import annotations

import csv
import re
from datetime import timedelta
from pathlib import Path

import pytest

from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.images.sources import ImageSource, read_source
from imgembed.migrate import sqlalchemy_url
from imgembed.models.names import ModelSpecError, embedding_dimension, parse_model_spec
from imgembed.report import format_table
from imgembed.settings import DEFAULT_MODEL, SettingsError, load_settings
from tests.conftest import TESTDATA

ODD_IMAGES = TESTDATA / "odd-images"


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = load_settings({})
    assert defaults.model == DEFAULT_MODEL and defaults.database_url is None and not defaults.allow_http
    assert 128 <= defaults.pg_shared_buffers_mb <= 1024
    custom = load_settings(
        {"IMGEMBED_BATCH_SIZE": "8", "IMGEMBED_ALLOWED_ROOTS": str(tmp_path), "IMGEMBED_ALLOW_HTTP": "yes",
         "DATABASE_URL": "postgresql://x/y", "IMGEMBED_DEVICE": "cuda:1", "IMGEMBED_PG_SHARED_BUFFERS_MB": "4096"}
    )
    assert custom.batch_size == 8 and custom.allowed_roots == (tmp_path.resolve(),) and custom.allow_http
    assert custom.device == "cuda:1" and custom.pg_shared_buffers_mb == 4096


def test_openmp_threads_wait_passively_in_workers_unless_told_otherwise() -> None:
    import os
    import subprocess
    import sys

    assert load_settings({}).openmp_wait_policy == "PASSIVE"
    assert load_settings({"OMP_WAIT_POLICY": "active"}).openmp_wait_policy == "ACTIVE"
    # The OpenMP runtime reads the variable once, when torch loads it: the worker command sets it
    # before anything imports torch, and importing the command line must not import it.
    script = "import sys, imgembed.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "False"
    # Set that way, it reaches PyTorch's OpenMP runtime, which says what it read when asked to
    # (OMP_DISPLAY_ENV): PASSIVE is no spinning at all, where OpenMP's default spins a while.
    script = ("import sys; from imgembed.worker.openmp import use_wait_policy; use_wait_policy(sys.argv[1]); "
              "import torch; torch.set_num_threads(2); a = torch.randn(64, 64); a @ a")
    shown = {policy: subprocess.run([sys.executable, "-c", script, policy], capture_output=True, text=True, check=True,
                                    env={**os.environ, "OMP_DISPLAY_ENV": "VERBOSE"}).stderr
             for policy in ("ACTIVE", "PASSIVE")}
    if "OPENMP DISPLAY ENVIRONMENT" not in shown["PASSIVE"]:
        pytest.skip("PyTorch's OpenMP runtime here is not GNU OpenMP, which displays its settings")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown["ACTIVE"]
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown["PASSIVE"] and "GOMP_SPINCOUNT = '0'" in shown["PASSIVE"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMGEMBED_BATCH_SIZE": "many"}, "not an integer"),
        ({"IMGEMBED_BATCH_SIZE": "0"}, "at least 1"),
        ({"IMGEMBED_ALLOW_HTTP": "maybe"}, "not a boolean"),
        ({"IMGEMBED_DEVICE": "tpu"}, "auto, cpu, cuda"),
        ({"IMGEMBED_LEASE_SECONDS": "-1"}, "must be positive"),
        ({"OMP_WAIT_POLICY": "sometimes"}, "ACTIVE or PASSIVE"),
        ({"IMGEMBED_PG_SHARED_BUFFERS_MB": "1GB"}, "IMGEMBED_PG_SHARED_BUFFERS_MB='1GB' is not an integer"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_model_names() -> None:
    assert parse_model_spec("ViT-B-32:laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    tiny = parse_model_spec("imgembed-tiny")
    assert tiny.random_weights and embedding_dimension(tiny) == 64
    local = parse_model_spec("ViT-B-32:/models/ft.pt")
    assert local.checkpoint_path == Path("/models/ft.pt") and embedding_dimension(local) == 512
    assert parse_model_spec("ViT-L-14:file:///m/x.pt").checkpoint_path == Path("/m/x.pt")
    with pytest.raises(ModelSpecError):
        parse_model_spec("  ")
    with pytest.raises(ModelSpecError, match="unknown OpenCLIP architecture"):
        embedding_dimension(parse_model_spec("NoSuchNet:tag"))


def test_sqlalchemy_url() -> None:
    assert sqlalchemy_url("postgresql://u@h:5/d") == "postgresql+psycopg://u@h:5/d"
    assert sqlalchemy_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        sqlalchemy_url("mysql://x")


def test_every_manifest_file_decodes_as_pillow_says() -> None:
    settings = load_settings({})
    with (ODD_IMAGES / "MANIFEST.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            source = ImageSource(uri=str(ODD_IMAGES / row["file"]))
            if row["pillow_result"] == "ok":
                image = decode_image(read_source(source, settings), settings, target_size=64)
                assert image.mode == "RGB", row["file"]
            else:
                with pytest.raises(ImageError):
                    decode_image(read_source(source, settings), settings)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A non-square photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to
    view) decodes upright: its pixels are the stored ones turned by Pillow's plain transpose."""
    from PIL import Image

    settings = load_settings({})
    photo = next(iter(sorted((TESTDATA / "photos").glob("*.JPEG"))))
    with Image.open(photo) as original:
        stored = original.convert("RGB")
    assert stored.width != stored.height
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = tmp_path / "sideways.jpg"
    stored.save(sideways, format="JPEG", quality=95, exif=exif)
    with Image.open(sideways) as raw:
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    decoded = decode_image(sideways.read_bytes(), settings)
    assert decoded.size == (stored.height, stored.width) == expected.size
    assert decoded.tobytes() == expected.tobytes()


def test_file_sources_are_checked(tmp_path: Path) -> None:
    inside = tmp_path / "root"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    (inside / "link.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"x")
    (inside / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (inside / "dangling.png").symlink_to(tmp_path / "elsewhere" / "missing.png")
    settings = load_settings({"IMGEMBED_ALLOWED_ROOTS": str(inside), "IMGEMBED_MAX_IMAGE_BYTES": "4"})
    assert read_source(ImageSource(uri=str(inside / "a.png")), settings) == b"x"
    cases = {
        str(tmp_path / "outside.png"): "outside allowed roots",
        str(inside / "link.png"): "outside allowed roots",
        str(inside / ".." / "outside.png"): "outside allowed roots",
        str(inside / "linked-folder" / "b.png"): "outside allowed roots",
        # Outside, existing or not: the same answer.
        str(tmp_path / "elsewhere" / "missing.png"): "outside allowed roots",
        str(inside / "dangling.png"): "outside allowed roots",
        str(inside / "linked-folder" / "missing.png"): "outside allowed roots",
        str(inside / "missing.png"): "file not found",
        "relative/a.png": "relative",
        "ftp://host/a.png": "unsupported URI scheme",
        "file://otherhost/a.png": "only local files",
        "https://example.com/a.png": "http(s) fetching is off",
        "": "empty",
    }
    for uri, message in cases.items():
        with pytest.raises(ImageError, match=re.escape(message)):
            read_source(ImageSource(uri=uri), settings)
    with pytest.raises(ImageError, match="not a regular file"):
        read_source(ImageSource(uri="/dev/zero"), load_settings({}))
    with pytest.raises(ImageError, match="over the cap"):
        read_source(ImageSource(content=b"12345"), settings)


def test_files_are_read_whole_up_to_the_cap(tmp_path: Path) -> None:
    photo = sorted((ODD_IMAGES.parent / "photos").glob("*.JPEG"))[0]
    no_roots = load_settings({})
    assert read_source(ImageSource(uri=str(photo)), no_roots) == photo.read_bytes()
    assert read_source(ImageSource(uri=photo.as_uri()), no_roots) == photo.read_bytes()
    with pytest.raises(ImageError, match=re.escape(f"file not found: {tmp_path / 'missing.jpg'}")):
        read_source(ImageSource(uri=str(tmp_path / "missing.jpg")), no_roots)
    with pytest.raises(ImageError, match="is a directory|not a regular file"):
        read_source(ImageSource(uri=str(tmp_path)), no_roots)
    (tmp_path / "five.png").write_bytes(b"12345")
    with pytest.raises(ImageError, match="5 bytes, over the cap of 4"):
        read_source(ImageSource(uri=str(tmp_path / "five.png")), load_settings({"IMGEMBED_MAX_IMAGE_BYTES": "4"}))


def test_format_table() -> None:
    text = format_table(["a", "bb"], [[1, None], ["long", timedelta(seconds=2)]])
    assert text.splitlines()[0] == "a     bb"
    assert "2.0s" in text and "-" in text.splitlines()[2]


def test_celery_worker_is_started_again_unless_asked_to_stop() -> None:
    from celery import signals

    from imgembed.worker.process import run_celery_worker

    class FlakyCelery:
        """Stops on its own the first time (as after a broker error), by a signal the second."""

        calls = 0

        def worker_main(self, argv: list[str]) -> None:
            self.calls += 1
            if self.calls == 2:
                signals.worker_shutting_down.send(sender=None, sig="SIGTERM", how="Warm", exitcode=0)
            raise SystemExit(0)

    app = FlakyCelery()
    run_celery_worker(app, ["worker"], backoff_seconds=0)
    assert app.calls == 2


def test_numpy_vector_dumper_matches_pgvector_binary_format() -> None:
    import numpy as np
    from pgvector import Vector

    from imgembed.db import NumpyVectorBinaryDumper

    values = np.array([0.5, -1.25, 3.0e-7, 42.0], dtype=np.float32)
    assert NumpyVectorBinaryDumper(np.ndarray).dump(values) == Vector(values).to_binary()
    assert NumpyVectorBinaryDumper(np.ndarray).dump(values.astype(np.float64)) == Vector(values).to_binary()


def test_freed_memory_goes_back_at_most_once_a_second() -> None:
    from imgembed.worker.process_state import TRIM_EVERY_SECONDS, WorkerState

    runtime = WorkerState(load_settings({}))
    runtime.return_freed_memory()
    first = runtime._last_trim
    assert first > 0
    runtime.return_freed_memory()  # too soon: skipped
    assert runtime._last_trim == first
    runtime._last_trim -= TRIM_EVERY_SECONDS
    runtime.return_freed_memory()
    assert runtime._last_trim > first - TRIM_EVERY_SECONDS


def test_open_clip_dimensions_shipped_with_the_core_agree_with_open_clip() -> None:
    """The core names a model's dimension without OpenCLIP; the table it reads says what OpenCLIP's
    own configurations say, for (nearly) every architecture OpenCLIP knows."""
    import json

    import open_clip

    from imgembed.models.names import known_open_clip_dimensions

    configs = Path(open_clip.__file__).parent / "model_configs"
    truth = {path.stem: json.loads(path.read_text())["embed_dim"] for path in configs.glob("*.json")}
    shipped = known_open_clip_dimensions()
    assert {name: shipped[name] for name in shipped.keys() & truth.keys()} == {
        name: truth[name] for name in shipped.keys() & truth.keys()}
    assert len(shipped.keys() & truth.keys()) >= 0.95 * len(truth)


def test_jobs_with_identical_bytes_are_grouped_once() -> None:
    import hashlib

    from imgembed.images.image_error import ImageError, Reason
    from imgembed.worker.content import group_by_content, hashed

    missing = ImageError(Reason.FILE_NOT_FOUND, "/nowhere.jpg")
    groups = group_by_content([1, 2, 3, 4, 5], [hashed(read) for read in (b"a", b"b", b"a", missing, b"a")])
    assert list(groups.jobs_by_hash.values()) == [[1, 3, 5], [2]]
    assert groups.data_by_hash[hashlib.sha256(b"a").digest()] == b"a"
    assert groups.unreadable == [(4, missing)]
    assert groups.hash_of_job() == {1: hashlib.sha256(b"a").digest(), 3: hashlib.sha256(b"a").digest(),
                                    5: hashlib.sha256(b"a").digest(), 2: hashlib.sha256(b"b").digest()}


def test_timm_model_names() -> None:
    from imgembed.models.names import ModelSpecError, embedding_dimension, parse_model_spec

    tagged = parse_model_spec("timm:resnet50.a1_in1k")
    assert (tagged.architecture, tagged.pretrained, tagged.is_timm, tagged.embeds_text) == (
        "timm:resnet50", "a1_in1k", True, False)
    assert parse_model_spec("timm:resnet50").random_weights
    local = parse_model_spec("timm:vgg16:/models/vgg16.pth")
    assert (local.timm_architecture, str(local.checkpoint_path)) == ("vgg16", "/models/vgg16.pth")
    assert not parse_model_spec("ViT-B-32:laion2b_s34b_b79k").is_timm
    # The article's backbones, their pooled penultimate features.
    assert {name: embedding_dimension(parse_model_spec(f"timm:{name}")) for name in (
        "resnet50", "mobilenetv2_100", "inception_v3", "vgg16", "vit_base_patch16_224")} == {
        "resnet50": 2048, "mobilenetv2_100": 1280, "inception_v3": 2048, "vgg16": 4096, "vit_base_patch16_224": 768}
    for bad in ("timm:", "timm:no_such_net"):
        with pytest.raises(ModelSpecError):
            embedding_dimension(parse_model_spec(bad))


def test_a_file_is_hashed_again_once_it_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import os

    from imgembed.models.names import file_sha256

    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"first")
    assert file_sha256(checkpoint) == hashlib.sha256(b"first").hexdigest()
    checkpoint.write_bytes(b"other")  # rewritten in place, same size
    os.utime(checkpoint, ns=(1, 1))
    assert file_sha256(checkpoint) == hashlib.sha256(b"other").hexdigest()


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`imgembed ... | head`: output to a pipe whose reader has gone ends quietly."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "imgembed", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
