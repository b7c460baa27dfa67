"""The model loading path: the bundled tiny architecture and a real checkpoint file through
OpenCLIP's own loader. No services."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgembed.models.names import parse_model_spec
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.embedding import load_model
from tests.conftest import TESTDATA


@pytest.fixture(scope="module")
def tiny():
    return load_model(parse_model_spec("imgembed-tiny"), "cpu")


def test_tiny_model_is_deterministic_and_normalised(tiny) -> None:
    again = load_model(parse_model_spec("imgembed-tiny"), "cpu")
    pixels = torch.stack([tiny.preprocess(Image.new("RGB", (80, 60), colour)) for colour in ("red", "blue")])
    first, second = tiny.embed_pixels(pixels), again.embed_pixels(pixels)
    assert first.shape == (2, 64) and tiny.dim == 64
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert not np.allclose(first[0], first[1])
    texts = tiny.embed_texts(["a red circle", "a blue square"])
    assert texts.shape == (2, 64)


def test_checkpoint_file_loads_through_open_clip(tiny, tmp_path: Path) -> None:
    state = {name: value.clone() for name, value in tiny.model.state_dict().items()}
    state["visual.proj"] = torch.randn_like(state["visual.proj"])  # distinguishable from the seed
    checkpoint = tmp_path / "tiny-finetuned.pt"
    torch.save({"state_dict": state}, checkpoint)

    loaded = load_model(parse_model_spec(f"imgembed-tiny:{checkpoint}"), "cpu")
    torch.testing.assert_close(loaded.model.state_dict()["visual.proj"], state["visual.proj"])
    pixels = tiny.preprocess(Image.new("RGB", (64, 64), "green")).unsqueeze(0)
    assert not np.allclose(loaded.embed_pixels(pixels), tiny.embed_pixels(pixels))


def test_unloadable_models_say_why(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(parse_model_spec(f"imgembed-tiny:{tmp_path / 'missing.pt'}"), "cpu")
    with pytest.raises(ModelLoadError, match="unknown OpenCLIP architecture"):
        load_model(parse_model_spec("NoSuchNet"), "cpu")


def test_finetune_smoke_loss_falls_and_checkpoint_loads(tmp_path: Path) -> None:
    from imgembed.settings import load_settings
    from imgembed.training.finetune import finetune, synthetic_pairs

    settings = load_settings({"IMGEMBED_DEVICE": "cpu", "IMGEMBED_DECODE_THREADS": "2"})
    result = finetune(synthetic_pairs(96, seed=1), settings, model_name="imgembed-tiny", from_scratch=True,
                      out=tmp_path / "smoke.pt", epochs=6, batch_size=32, learning_rate=2e-3, holdout=0.2,
                      show_progress=False)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert set(result.recall_after) == {"recall@1", "recall@5"}
    loaded = load_model(parse_model_spec(f"imgembed-tiny:{result.checkpoint}"), "cpu")
    saved = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(loaded.model.state_dict()["visual.proj"], saved["visual.proj"].float())


def test_csv_pairs(tmp_path: Path) -> None:
    from imgembed.training.finetune import pairs_from_csv

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("path,caption\na.png,a red square\n")
    (pair,) = pairs_from_csv(tmp_path / "pairs.csv")
    assert pair.caption == "a red square" and pair.source.uri == str(tmp_path / "a.png")
    with pytest.raises(ValueError, match="caption"):
        (tmp_path / "bad.csv").write_text("path,words\na.png,x\n")
        pairs_from_csv(tmp_path / "bad.csv")


def test_cut_transform_gives_open_clips_pixels_to_the_bit(tiny) -> None:
    """A CPU worker's decode threads normalise each picture in numpy; for a GPU they hand over
    uint8 arrays and each pass normalises its batch on the device (the same code runs here on the
    CPU). Pixels and vectors must be exactly those of OpenCLIP's own transform, mixes included."""
    assert tiny.cut is not None
    photos = sorted((TESTDATA / "photos").glob("*.JPEG"))[:6]
    pictures = [Image.open(path).convert("RGB") for path in photos] + [Image.new("RGB", (80, 60), "red")]
    reference = torch.stack([tiny.preprocess(picture) for picture in pictures])

    on_cpu = [tiny.prepare(picture) for picture in pictures]
    assert all(isinstance(item, torch.Tensor) for item in on_cpu)
    assert torch.equal(torch.stack(on_cpu), reference)  # type: ignore[arg-type]

    as_bytes = [tiny.cut.to_array(picture) for picture in pictures]
    assert all(isinstance(item, np.ndarray) and item.dtype == np.uint8 for item in as_bytes)
    assert torch.equal(tiny.stack_pixels(as_bytes), reference)  # type: ignore[arg-type]
    mixed = [item if index % 2 else tiny.preprocess(picture)
             for index, (item, picture) in enumerate(zip(as_bytes, pictures))]
    assert torch.equal(tiny.stack_pixels(mixed), reference)  # type: ignore[arg-type]
    np.testing.assert_array_equal(tiny.embed_images(as_bytes), tiny.embed_pixels(reference))  # type: ignore[arg-type]


def test_a_transform_of_another_shape_runs_whole(tiny) -> None:
    from torchvision import transforms

    from imgembed.worker.pytorch.pixels import CutTransform

    assert CutTransform.from_open_clip(transforms.Compose([transforms.ToTensor()])) is None
    assert CutTransform.from_open_clip(lambda image: image) is None
    to_grey = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor(),
                                  transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    cut = CutTransform.from_open_clip(to_grey)
    assert cut is not None and cut.to_array(Image.new("RGB", (8, 8), "blue")) is None  # not RGB: runs whole
    uncut = dataclasses.replace(tiny, cut=None)
    picture = Image.new("RGB", (70, 90), "green")
    assert isinstance(uncut.prepare(picture), torch.Tensor)
    assert torch.equal(uncut.stack_pixels([uncut.prepare(picture)]), tiny.stack_pixels([tiny.prepare(picture)]))
    with pytest.raises(TypeError, match="not cut"):
        uncut.stack_pixels([tiny.cut.to_array(picture)])
