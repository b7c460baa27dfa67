"""The model loading path: the bundled tiny architecture and a real checkpoint file through
OpenCLIP's own loader. No services."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.embedding import ModelLoadError, load_model
from worker.model_spec import parse_model_spec


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
