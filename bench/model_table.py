"""The model menu: for each model, its output dimension, parameters, GFLOPs per image, images/s of
its image tower here, the peak memory of a process that runs it, and whether it embeds texts.
Each model is measured in a process of its own, so that one model's memory is not another's.

``imgembed bench --models timm:resnet50,ViT-B-32 --out docs/models.md`` writes the table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from imgembed.bench.machine import git_revision, machine_description
from imgembed.bench.results import BenchSize

# The article's backbones (image-only, from timm), CLIP's ViT-B-32 and ViT-L-14, and a MobileCLIP.
DEFAULT_MODELS = ("timm:vgg16.tv_in1k", "timm:resnet50.a1_in1k", "timm:inception_v3.tv_in1k",
                  "timm:mobilenetv2_100.ra_in1k", "timm:vit_base_patch16_224.augreg_in21k", "ViT-B-32", "ViT-L-14",
                  "MobileCLIP-S2")
BATCH = 16


def _random_weights(name: str) -> str:
    """The same architecture with seeded random weights: the same speed and memory, no download."""
    from imgembed.models.names import TIMM_PREFIX, parse_model_spec

    spec = parse_model_spec(name)
    if spec.checkpoint_path is not None or spec.random_weights:
        return name
    return f"{TIMM_PREFIX}{spec.timm_architecture}" if spec.is_timm else spec.architecture


def measure(name: str, seconds: float, images: int) -> dict[str, object]:
    """In this process: load the image tower on the CPU with PyTorch, count, time and weigh it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imgembed.bench.peak_memory import memory_mb
    from imgembed.bench.timing import images_per_s
    from imgembed.models.names import parse_model_spec
    from imgembed.worker.pytorch.embedding import load_model
    from imgembed.worker.pytorch.timm_model import load_timm_model

    torch.set_num_threads(os.cpu_count() or 1)
    spec = parse_model_spec(_random_weights(name))
    model = load_timm_model(spec, "cpu") if spec.is_timm else load_model(spec, "cpu", tower="image")
    size = model.input_size
    with FlopCounterMode(display=False) as counter:
        model.embed_pixels(torch.zeros(1, 3, size, size))
    pixels = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    rate = images_per_s(model.embed_pixels, pixels, BATCH, images, seconds)
    (peak_mb,) = memory_mb(os.getpid(), "VmHWM")
    return {"model": name, "dim": model.dim, "input": size,
            "parameters": sum(parameter.numel() for parameter in model.model.parameters()),
            "gflops": counter.get_total_flops() / 1e9, "images_per_s": rate, "peak_mb": peak_mb,
            "text": spec.embeds_text}


def _measure_elsewhere(name: str, size: BenchSize) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-m", "imgembed.bench.model_table", "--measure", name,
                             "--seconds", str(size.raw_seconds), "--images", str(min(size.raw_images, 2 * BATCH))],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"measuring {name} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_table(models: Sequence[str], size: BenchSize, out: Path) -> list[dict[str, object]]:
    """Measure each model (printing its row as it comes) and write the table to ``out``."""
    rows = []
    header = ["model", "dim", "input", "parameters", "GFLOPs per image", "images/s (CPU)", "peak memory",
              "embeds text"]
    lines = ["# Models", "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
             f"{git_revision()} with `imgembed bench --models {','.join(models)}`.", "", *machine_description(),
             f"- each model's image tower on the CPU with PyTorch, batches of {BATCH}, for at least "
             f"{size.raw_seconds:g} s; seeded random weights of the same architecture (the same speed and memory; "
             "a pretrained tag names the weights a deployment would use)",
             "- GFLOPs: floating-point operations of one image's forward pass as PyTorch counts them (a "
             "multiply-add is 2); peak memory: the most resident memory of a process that imports PyTorch, "
             "loads the tower and embeds the batches", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in models:
        row = _measure_elsewhere(name, size)
        rows.append(row)
        line = (f"| `{row['model']}` | {row['dim']} | {row['input']} px | {int(row['parameters']) / 1e6:.1f} M | "  # type: ignore[call-overload]
                f"{row['gflops']:.3g} | {row['images_per_s']:.1f} | {row['peak_mb']:,.0f} MB | "
                f"{'yes' if row['text'] else 'no'} |")
        lines.append(line)
        print(line, flush=True)
    lines += ["", "```json", json.dumps(rows, indent=1), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"\nwritten to {out}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgembed.bench.model_table",
                                     description="Measure one model's image tower (a row of the model table).")
    parser.add_argument("--measure", required=True, help="model name")
    parser.add_argument("--seconds", type=float, default=BenchSize().raw_seconds)
    parser.add_argument("--images", type=int, default=2 * BATCH)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.measure, args.seconds, args.images)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
