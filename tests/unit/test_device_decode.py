"""JPEG decoding on the model's device (IMGEMBED_JPEG_DECODE=device), checked here on the CPU:
the same decoder and tensor transform run there; only nvJPEG differs on a GPU."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from imgembed import queue
from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.settings import SettingsError, load_settings
from imgembed.worker.pipeline import _prepare_on_device, _read, preprocess_bytes
from imgembed.worker.process_state import WorkerState
from imgembed.worker.pytorch.device_decode import TensorPreprocess, apply_orientation, jpeg_orientation
from tests.conftest import TESTDATA


@pytest.fixture(scope="module")
def runtime() -> WorkerState:
    return WorkerState(load_settings({"IMGEMBED_JPEG_DECODE": "device", "IMGEMBED_RUNTIME": "torch"}))  # a GPU path


def claimed(paths: list[Path]) -> list[queue.ClaimedImage]:
    return [queue.ClaimedImage(index, str(index), None, str(path), None) for index, path in enumerate(paths)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation: int) -> None:
    pixels = (np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3) * 5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
    got = apply_orientation(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_photos_match_pillow_full_decode_and_open_clip_transform(runtime: WorkerState) -> None:
    model = runtime.model("imgembed-tiny", "image")
    transform = TensorPreprocess.from_open_clip(model.preprocess)
    assert transform is not None and transform.size == model.input_size
    photos = sorted((TESTDATA / "photos").glob("*.JPEG"))[:12]
    assert len(photos) == 12, f"the test photos are missing from {TESTDATA / 'photos'}"
    on_device = _prepare_on_device(runtime, [photo.read_bytes() for photo in photos], model, transform)
    for path, pixels in zip(photos, on_device):
        assert isinstance(pixels, torch.Tensor), path
        reference = model.preprocess(decode_image(path.read_bytes(), runtime.settings))  # no draft mode
        assert float((pixels - reference).abs().mean()) < 1e-3, path.name


def test_every_odd_file_succeeds_or_fails_as_through_pillow(runtime: WorkerState) -> None:
    model = runtime.model("imgembed-tiny", "image")
    transform = TensorPreprocess.from_open_clip(model.preprocess)
    assert transform is not None
    folder = TESTDATA / "odd-images"
    with (folder / "MANIFEST.csv").open(newline="") as handle:
        names = [row["file"] for row in csv.DictReader(handle)]
    assert len(names) > 40, f"the odd images' manifest in {folder} is missing or short"
    reads = [_read(item, runtime.settings) for item in claimed([folder / name for name in names])]
    readable = [(name, data) for name, data in zip(names, reads) if isinstance(data, bytes)]
    assert len(readable) > 40
    on_device = _prepare_on_device(runtime, [data for _, data in readable], model, transform)
    for (name, data), result in zip(readable, on_device, strict=True):
        through_pillow = preprocess_bytes(data, model, runtime.settings)
        assert isinstance(result, ImageError) == isinstance(through_pillow, ImageError), name
        if isinstance(result, ImageError):
            assert str(result) == str(through_pillow), name


def test_only_plain_jpegs_take_the_device_path() -> None:
    settings = load_settings({})
    folder = TESTDATA / "odd-images"
    assert jpeg_orientation((folder / "hopper.jpg").read_bytes(), settings) == 1
    assert jpeg_orientation((folder / "hopper_orientation_6.jpg").read_bytes(), settings) == 6
    assert jpeg_orientation((folder / "pil_sample_cmyk.jpg").read_bytes(), settings) is None
    assert jpeg_orientation((folder / "hopper.png").read_bytes(), settings) is None
    tiny_cap = load_settings({"IMGEMBED_MAX_PIXELS": "100"})
    assert jpeg_orientation((folder / "hopper.jpg").read_bytes(), tiny_cap) is None


def test_the_setting_is_checked() -> None:
    assert load_settings({}).jpeg_decode == "pillow"
    with pytest.raises(SettingsError, match="IMGEMBED_JPEG_DECODE"):
        load_settings({"IMGEMBED_JPEG_DECODE": "gpu"})
