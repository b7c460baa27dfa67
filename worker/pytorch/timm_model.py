"""Image-only models from timm (``timm:resnet50.a1_in1k``): the globally pooled penultimate feature,
L2-normalised, as the embedding, with timm's own evaluation transform. They have no text tower.

``python -m imgembed.worker.pytorch.timm_model`` writes the output dimensions of timm's architectures
(imgembed/models/timm_dims.json), which the core reads without timm installed."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from imgembed.models.names import RANDOM_INIT_SEED, TIMM_DIMS_FILE, TIMM_FAMILIES, ModelSpec
from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.pytorch.embedding import LoadedModel, resolve_device
from imgembed.worker.pytorch.pixels import CutTransform

log = logging.getLogger(__name__)


class PooledFeatures(torch.nn.Module):
    """A timm model without its classifier, shown to the rest of the worker as an image encoder."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)  # num_classes=0: pooled pre-logits features


def _no_text(spec: ModelSpec) -> ModelLoadError:
    return ModelLoadError(f"model {spec.name} embeds images only (no text tower); texts need a CLIP model "
                          "such as ViT-B-32:laion2b_s34b_b79k")


def _build(spec: ModelSpec) -> torch.nn.Module:
    import timm

    architecture = spec.timm_architecture
    checkpoint = spec.checkpoint_path
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise ModelLoadError(f"model {spec.name}: checkpoint {checkpoint} does not exist")
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, _ = model.load_state_dict(state, strict=False)  # the classifier's weights are not needed
        if missing:
            raise ModelLoadError(f"model {spec.name}: checkpoint {checkpoint} lacks {len(missing)} weights, "
                                 f"e.g. {missing[0]}")
        return model
    if spec.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return timm.create_model(architecture, pretrained=False, num_classes=0)
    return timm.create_model(f"{architecture}.{spec.pretrained}", pretrained=True, num_classes=0)


def load_timm_model(spec: ModelSpec, device_setting: str = "auto", tower: str = "image") -> LoadedModel:
    """The model in eval mode on the chosen device (seeded random weights, a local checkpoint, or a
    pretrained tag that timm downloads), with timm's evaluation transform for its weights."""
    import timm
    import timm.data

    if tower == "text":
        raise _no_text(spec)
    if spec.timm_architecture not in timm.list_models():
        raise ModelLoadError(f"model {spec.name}: unknown timm architecture {spec.timm_architecture!r} "
                             "(see timm.list_models())")
    device = resolve_device(device_setting)
    try:
        model = _build(spec)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - timm and the hub raise many kinds; all mean "cannot load"
        raise ModelLoadError(f"model {spec.name} could not be loaded: {type(error).__name__}: {error}") from error
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = timm.data.create_transform(**config, is_training=False)
    input_size = int(config["input_size"][-1])
    encoder = PooledFeatures(model).eval().to(device)
    with torch.inference_mode():
        dim = int(encoder.encode_image(torch.zeros(1, 3, input_size, input_size, device=device)).shape[-1])

    def tokenizer(_texts: Sequence[str]) -> torch.Tensor:
        raise _no_text(spec)

    log.info("loaded model %s (image-only, timm) on %s (dim %s, input %spx)", spec.name, device, dim, input_size)
    return LoadedModel(spec, encoder, preprocess, tokenizer, device, dim, input_size,
                       CutTransform.from_open_clip(preprocess), None)


def output_dimensions(architectures: Sequence[str]) -> dict[str, int]:
    """Each architecture's embedding dimension, from a forward pass on the meta device (no memory)."""
    import timm

    dims = {}
    for architecture in architectures:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0)
            size = timm.data.resolve_data_config({}, model=model)["input_size"]
            try:
                dims[architecture] = int(model(torch.empty(1, *size)).shape[-1])
            except Exception:  # noqa: BLE001 - a few models cannot run on the meta device
                dims[architecture] = int(model.num_features)  # type: ignore[arg-type]  # an int on every timm model
    return dims


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgembed.worker.pytorch.timm_model",
                                     description="Write the output dimensions of timm's architectures "
                                                 f"({', '.join(TIMM_FAMILIES)}) for imgembed's core.")
    parser.add_argument("--out", default=str(TIMM_DIMS_FILE), help=f"where to write them (default {TIMM_DIMS_FILE})")
    args = parser.parse_args(argv)
    import timm

    names = sorted({name for family in TIMM_FAMILIES for name in timm.list_models(family)})
    table = {"timm": timm.__version__, "dim": output_dimensions(names)}
    Path(args.out).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(names)} architectures written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
