"""Workers build only the tower a job needs (imgembed.worker.pytorch.towers): the image tower for pictures, the text
tower for text queries. Weights, transform and vectors must be exactly those of OpenCLIP's full
loader, for seeded random weights and for every checkpoint layout; what it cannot read goes to
OpenCLIP's loader. No services."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgembed.models.names import parse_model_spec
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.embedding import LoadedModel, load_model
from imgembed.worker.pytorch.towers import _all_real, build_image_tower, build_text_tower, read_weights

PICTURES = [Image.new("RGB", (80, 60), colour) for colour in ("red", "navy", "olive")]
TEXTS = ["a red square", "a navy circle", "an olive triangle"]


def _vectors(model: LoadedModel) -> np.ndarray:
    return model.embed_pixels(torch.stack([model.preprocess(picture) for picture in PICTURES]))


def _same_image_weights(alone: LoadedModel, whole: LoadedModel) -> None:
    alone_state, whole_state = alone.model.state_dict(), whole.model.state_dict()
    image_names = sorted(name for name in whole_state if name.startswith("visual."))
    assert sorted(alone_state) == image_names  # nothing of the text tower was made
    for name in image_names:
        assert torch.equal(alone_state[name], whole_state[name]), name
    np.testing.assert_array_equal(_vectors(alone), _vectors(whole))


def _same_text_weights(alone: LoadedModel, whole: LoadedModel) -> None:
    alone_state, whole_state = alone.model.state_dict(), whole.model.state_dict()
    text_names = sorted(name for name in whole_state if not name.startswith("visual.") and name != "logit_scale")
    assert sorted(alone_state) == text_names  # nothing of the image tower was made
    for name in text_names:
        assert torch.equal(alone_state[name], whole_state[name]), name
    assert alone.dim == whole.dim
    np.testing.assert_array_equal(alone.embed_texts(TEXTS), whole.embed_texts(TEXTS))


@pytest.mark.parametrize("name", ["imgembed-tiny", "ViT-B-32"])
def test_image_tower_alone_draws_the_full_models_random_weights(name: str) -> None:
    alone = load_model(parse_model_spec(name), "cpu", tower="image")
    whole = load_model(parse_model_spec(name), "cpu", tower="both")
    assert alone.model.transformer is None and alone.model.logit_scale is None
    assert alone.dim == whole.dim and alone.input_size == whole.input_size
    _same_image_weights(alone, whole)
    text_only = load_model(parse_model_spec(name), "cpu", tower="text")  # still OpenCLIP's loader
    np.testing.assert_array_equal(text_only.embed_texts(["a red square"]), whole.embed_texts(["a red square"]))


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """imgembed-tiny's state with weights no seed gives, in both towers."""
    state = load_model(parse_model_spec("imgembed-tiny"), "cpu").model.state_dict()
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(value.shape, generator=generator) * 0.05 if value.is_floating_point() else value
            for name, value in state.items()}


def _save(state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    if layout == "zip":
        torch.save(state, path)
    elif layout == "legacy":  # not a zip: read without memory-mapping
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif layout == "wrapped":  # a training script's {"state_dict": ...} of a DataParallel model
        torch.save({"state_dict": {f"module.{name}": value for name, value in state.items()}}, path)
    elif layout == "half":
        torch.save({name: value.half() if value.is_floating_point() else value for name, value in state.items()},
                   path)
    else:
        from safetensors.torch import save_file

        save_file({name: value.contiguous() for name, value in state.items()}, str(path))


@pytest.mark.parametrize("layout", ["zip", "legacy", "wrapped", "half", "safetensors"])
def test_checkpoints_load_into_each_tower_alone(trained_state, tmp_path: Path, layout: str) -> None:
    checkpoint = tmp_path / ("tiny.safetensors" if layout == "safetensors" else "tiny.pt")
    _save(trained_state, checkpoint, layout)
    spec = parse_model_spec(f"imgembed-tiny:{checkpoint}")
    alone = load_model(spec, "cpu", tower="image")
    whole = load_model(spec, "cpu", tower="both")
    assert all(parameter.dtype == torch.float32 for parameter in alone.model.parameters())
    _same_image_weights(alone, whole)
    text_alone = load_model(spec, "cpu", tower="text")
    assert text_alone.model.visual is None
    # Each tower was built alone, not by OpenCLIP's full loader with the other dropped after.
    assert build_image_tower("imgembed-tiny", str(checkpoint), 0) is not None
    assert build_text_tower("imgembed-tiny", str(checkpoint)) is not None
    _same_text_weights(text_alone, whole)
    if layout == "half":
        return
    torch.testing.assert_close(alone.model.state_dict()["visual.proj"], trained_state["visual.proj"], rtol=0, atol=0)
    torch.testing.assert_close(text_alone.model.state_dict()["text_projection"], trained_state["text_projection"],
                               rtol=0, atol=0)


def test_zip_checkpoints_are_memory_mapped(trained_state, tmp_path: Path) -> None:
    """The weights stay pages of the checkpoint file: no copy is made, and workers share them."""
    checkpoint = tmp_path / "tiny.pt"
    torch.save(trained_state, checkpoint)
    weights = read_weights(checkpoint, lambda name: name.startswith("visual."))
    assert sorted(weights) == sorted(name for name in trained_state if name.startswith("visual."))
    assert _mapped_file(weights["visual.proj"].data_ptr()) == str(checkpoint)


def _mapped_file(address: int) -> str | None:
    """The file whose mapping holds this address in this process (Linux's /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # span, permissions, offset, device, inode[, path]
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


def test_checkpoints_without_image_keys_go_to_open_clips_loader(trained_state, tmp_path: Path) -> None:
    """A layout only OpenCLIP's converters could read is handed to OpenCLIP, which says what is wrong."""
    checkpoint = tmp_path / "renamed.pt"
    torch.save({f"vision_model.{name}": value for name, value in trained_state.items()}, checkpoint)
    assert read_weights(checkpoint, lambda name: name.startswith("visual.")) == {}
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_model(parse_model_spec(f"imgembed-tiny:{checkpoint}"), "cpu", tower="image")
    wrong_shape = tmp_path / "wrong-shape.pt"
    torch.save({**trained_state, "visual.proj": torch.zeros(3, 3)}, wrong_shape)
    with pytest.raises(ModelLoadError, match="visual.proj|proj"):
        load_model(parse_model_spec(f"imgembed-tiny:{wrong_shape}"), "cpu", tower="image")


def test_saving_a_checkpoint_again_leaves_workers_that_mapped_it_alone(trained_state, tmp_path: Path) -> None:
    """A worker's weights are pages of the file it loaded. imgembed writes a checkpoint beside the
    old one and renames it over, so a worker keeps the weights it started with (a file rewritten in
    place would change them under it)."""
    from imgembed.training.finetune import save_checkpoint

    checkpoint = tmp_path / "ft.pt"
    save_checkpoint(load_model(parse_model_spec("imgembed-tiny"), "cpu"), checkpoint, half=False)
    worker_model = load_model(parse_model_spec(f"imgembed-tiny:{checkpoint}"), "cpu", tower="image")
    before = _vectors(worker_model)
    retrained = tmp_path / "retrained.pt"
    torch.save(trained_state, retrained)
    save_checkpoint(load_model(parse_model_spec(f"imgembed-tiny:{retrained}"), "cpu"), checkpoint, half=False)
    np.testing.assert_array_equal(_vectors(worker_model), before)
    reloaded = load_model(parse_model_spec(f"imgembed-tiny:{checkpoint}"), "cpu", tower="image")
    assert not np.allclose(_vectors(reloaded), before)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ft.pt", "retrained.pt"]


def test_a_tower_with_buffers_no_checkpoint_holds_is_left_to_open_clips_loader() -> None:
    """Some timm towers compute index buffers at construction and never save them: on the meta
    frame they would stay empty, so such a model goes to OpenCLIP's loader instead."""
    tower = torch.nn.Linear(2, 2)
    assert _all_real(tower, "made")
    tower.register_buffer("position_index", torch.empty(4, dtype=torch.long, device="meta"), persistent=False)
    assert not _all_real(tower, "timm-like")
