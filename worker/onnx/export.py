"""Exporting one tower of an OpenCLIP model to ONNX, in a process of its own: the export needs
PyTorch, which a worker on the ONNX path never loads (imgembed.worker.onnx.cache starts it).

The model is loaded exactly as a PyTorch worker loads it (its configuration, tag, checkpoint or
seeded random weights), traced with a batch dimension left free, and checked before it is kept:
ONNX Runtime's vectors must agree with PyTorch's to cosine >= 0.9999 on real inputs, the
torch-free preprocessing must give the transform's pixels exactly, and the torch-free tokenizer
the tokenizer's ids. Each file is written under a temporary name and renamed into place.

With ``--quantize int8`` it also writes the tower with int8 weights twice, in 8 and in 7 bits
(imgembed.worker.onnx.int8_weights says which a CPU runs).

    python -m imgembed.worker.onnx.export MODEL {image,text} OUT_DIR [--quantize int8] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from imgembed.worker.model_errors import ModelLoadError
from imgembed.worker.onnx.clip_tokenizer import MERGES_FILE, ClipTokenizer
from imgembed.worker.onnx.int8_weights import WEIGHT_BITS
from imgembed.worker.onnx.pixels import ImageSteps

AGREEMENT = 0.9999  # least cosine between a tower's ONNX and PyTorch vectors
INT8_NAMES = {8: "int8", 7: "int8-7bit"}  # weight bits -> the quantised file's middle name
SAMPLE_TEXTS = ["a photo of a dog", "Two RED squares!", "naïve café ✓", "it's 3 o'clock &amp; more", "x" * 200, ""]


class Unsupported(Exception):
    """This tower cannot run on ONNX Runtime the way the worker runs it (said why)."""


def _sample_pictures(size: int) -> list[Any]:
    """Pictures of several shapes and contents: wide, tall, square, tiny, and already the size."""
    from PIL import Image

    generator = np.random.default_rng(7)
    shapes = [(size * 3, size * 2), (size, size * 4), (size, size), (size // 3 + 1, size // 2 + 1), (457, 331)]
    return [Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for width, height in shapes]


def _image_steps(model: Any) -> ImageSteps:
    """The transform as torch-free steps, checked against the transform itself."""
    config = getattr(getattr(model.model, "visual", None), "preprocess_cfg", None)
    if not config:
        raise Unsupported("the image transform has no OpenCLIP preprocess configuration")
    size = config["size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    steps = ImageSteps(size, str(config.get("resize_mode", "shortest")), str(config.get("interpolation", "bicubic")),
                       tuple(float(x) for x in config["mean"]), tuple(float(x) for x in config["std"]))  # type: ignore[arg-type]
    if steps.resize_mode not in ("shortest", "squash"):
        raise Unsupported(f"resize mode {steps.resize_mode!r}")
    for picture in _sample_pictures(size):
        expected = model.preprocess(picture).numpy()
        found = steps(picture)
        if found.shape != expected.shape or float(np.abs(found - expected).max()) > 1e-6:
            raise Unsupported("the torch-free preprocessing does not give the transform's pixels")
    return steps


def _merges_file() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / MERGES_FILE


def _check_tokenizer(model: Any, context_length: int) -> None:
    ours = ClipTokenizer(_merges_file(), context_length)(SAMPLE_TEXTS)
    theirs = model.tokenizer(SAMPLE_TEXTS).numpy()
    if ours.shape != theirs.shape or not (ours == theirs).all():
        raise Unsupported("the model's tokenizer is not CLIP's byte-pair tokenizer")


def _agreement(onnx_file: Path, feed: dict[str, np.ndarray], expected: np.ndarray) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    found = session.run(None, feed)[0]
    found = found / np.linalg.norm(found, axis=1, keepdims=True)
    return float((found * expected).sum(axis=1).min())


def _shared_mode() -> int:
    """The mode a new file gets under this process's umask: workers of other users read exports."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _written(out_dir: Path, name: str, write: Any) -> Path:
    """``write(path)`` to a temporary file in ``out_dir``, then renamed to ``name``."""
    handle, temporary = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, _shared_mode())
        os.replace(temporary, out_dir / name)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out_dir / name


def _save_with_external_weights(traced: Path, out_dir: Path, name: str) -> Path:
    """The traced graph as ``name`` with its weights in ``name.data`` beside it: ONNX Runtime then
    maps the weights from that file instead of copying them out of the graph (ViT-B-32's worker:
    about 540 MB of RSS at its peak instead of 710)."""
    import onnx

    scratch = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    try:
        onnx.save_model(onnx.load(str(traced)), str(scratch / name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=1024)
        for part in (f"{name}.data", name):  # the graph last: it names the weights' file
            os.chmod(scratch / part, _shared_mode())
            os.replace(scratch / part, out_dir / part)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir / name


def _quantized(fp32: Path, out_dir: Path, name: str, bits: int, feed: dict[str, np.ndarray],
               expected: np.ndarray) -> dict[str, Any]:
    """Dynamic int8 quantisation of the matrix products' weights, one scale per output channel, in
    ``bits`` bits (7: for x86 CPUs without VNNI, see imgembed.worker.onnx.int8_weights). The patch
    convolution stays float32: ONNX Runtime's integer convolution is slow (ViT-B-32 on 2 cores: 45
    images/s with it quantised too, 54 without), and it is 3% of the work."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = _written(out_dir, name, lambda path: quantize_dynamic(
        str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=bits == 7,
        op_types_to_quantize=["MatMul", "Gemm"]))
    return {"file": int8.name, "agreement": _agreement(int8, feed, expected)}


def export_tower(model_name: str, tower: str, out_dir: Path, quantize: str | None, model_dir: Path | None) -> dict:
    """Export, check and describe one tower; returns its manifest (also written as TOWER.json)."""
    import torch

    from imgembed.models.names import parse_model_spec
    from imgembed.worker.pytorch.embedding import load_model

    model = load_model(parse_model_spec(model_name), "cpu", tower=tower, model_dir=model_dir)  # type: ignore[arg-type]
    manifest: dict[str, Any] = {"model": model_name, "tower": tower, "dim": model.dim, "input_size": model.input_size,
                                "torch": torch.__version__}
    if tower == "image":
        steps = _image_steps(model)
        manifest["image_steps"] = steps.as_dict()
        inputs = torch.from_numpy(np.stack([steps(picture) for picture in _sample_pictures(steps.size)]))
        input_name = "pixels"
    else:
        context_length = int(model.tokenizer(["a"]).shape[1])
        _check_tokenizer(model, context_length)
        manifest["context_length"] = context_length
        shutil.copyfile(_merges_file(), out_dir / MERGES_FILE)
        inputs = model.tokenizer(SAMPLE_TEXTS)
        input_name = "tokens"

    class Tower(torch.nn.Module):
        """The tower's unit vectors; the model is held as a submodule, so its weights are the graph's."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model.model.requires_grad_(False)

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            features = self.model.encode_image(batch) if tower == "image" else self.model.encode_text(batch)
            return torch.nn.functional.normalize(features, dim=-1)

    with torch.inference_mode():
        expected = Tower()(inputs).numpy()

    def export(path: Path) -> None:
        # Traced without PyTorch's fused attention kernel, which has no ONNX counterpart.
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Tower(), (inputs,), str(path), input_names=[input_name], output_names=["embedding"],
                              dynamic_axes={input_name: {0: "batch"}}, opset_version=17, dynamo=False)

    traced = _written(out_dir, f".{tower}.traced.onnx", export)
    try:
        fp32 = _save_with_external_weights(traced, out_dir, f"{tower}.onnx")
    finally:
        traced.unlink(missing_ok=True)
    feed = {input_name: inputs.numpy()}
    manifest["agreement"] = _agreement(fp32, feed, expected)
    if manifest["agreement"] < AGREEMENT:
        fp32.unlink()
        fp32.with_name(fp32.name + ".data").unlink(missing_ok=True)
        raise Unsupported(f"ONNX Runtime's vectors agree with PyTorch's to cosine {manifest['agreement']:.6f} only")
    manifest["file"] = fp32.name
    if quantize == "int8":
        manifest["int8"] = {str(bits): _quantized(fp32, out_dir, f"{tower}.{INT8_NAMES[bits]}.onnx", bits, feed, expected)
                            for bits in WEIGHT_BITS}
    _written(out_dir, f"{tower}.json", lambda path: path.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgembed.worker.onnx.export",
                                     description="Export one tower of an OpenCLIP model to ONNX (needs PyTorch).")
    parser.add_argument("model", help="the model's name, as IMGEMBED_MODEL gives it")
    parser.add_argument("tower", choices=["image", "text"])
    parser.add_argument("out_dir", type=Path, help="folder to write TOWER.onnx and TOWER.json into")
    parser.add_argument("--quantize", choices=["int8"],
                        help="also write TOWER.int8.onnx and TOWER.int8-7bit.onnx (dynamic quantisation)")
    parser.add_argument("--model-dir", type=Path, help="the model directory (IMGEMBED_MODEL_DIR)")
    arguments = parser.parse_args(argv)
    arguments.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = export_tower(arguments.model, arguments.tower, arguments.out_dir, arguments.quantize,
                                arguments.model_dir)
    except Unsupported as error:
        print(json.dumps({"unsupported": str(error)}))
        return 3
    except ModelLoadError as error:  # e.g. weights this host does not have: said in one line
        print(json.dumps({"error": str(error)}))
        return 2
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
