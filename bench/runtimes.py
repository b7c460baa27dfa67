"""(8): PyTorch against ONNX Runtime on this machine, in one run: the image tower alone (images/s at
the worker's batch size, float32 and int8), the most any float32 runtime could give here
(imgembed.bench.ceiling), how far int8 moves the vectors (recall@10 of int8 neighbours among fp32
neighbours, over the bench photos, for 8- and 7-bit weights), and the peak memory of a process that
loads the tower the way a worker does and embeds photos with it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from imgembed.bench.ceiling import SIDE, flops_per_image, matrix_product_rates
from imgembed.bench.photos import photo_files
from imgembed.bench.results import BenchSize, Results
from imgembed.bench.timing import images_per_s
from imgembed.settings import Settings

# A worker's model alone, in a process of its own: load the image tower on one runtime, embed the
# photos as a worker does (decode, prepare, forward passes of 32), report the peak RSS (VmHWM) and
# whether PyTorch was loaded.
_EMBED_PHOTOS = """
import json, sys
from pathlib import Path
from imgembed.models.names import parse_model_spec
from imgembed.settings import load_settings
from imgembed.images.decode import decode_image
runtime, model_name, photo_dir = sys.argv[1:4]
settings = load_settings()
spec = parse_model_spec(model_name)
if runtime == "onnx":
    from imgembed.worker.onnx.model import load_onnx_model
    model = load_onnx_model(spec, "image", settings)
else:
    from imgembed.worker.pytorch.embedding import load_model
    model = load_model(spec, "cpu", tower="image", model_dir=settings.models_path)
paths = sorted(Path(photo_dir).glob("*.JPEG"))
for start in range(0, len(paths), 32):
    model.embed_images([model.prepare(decode_image(p.read_bytes(), settings, target_size=model.input_size))
                        for p in paths[start:start + 32]])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_rss_mb": peak / 1024, "torch_loaded": "torch" in sys.modules}))
"""


def _recall_at_10(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean share of each photo's 10 nearest photos (by ``reference``) that ``other`` also puts in
    its 10 nearest."""
    def neighbours(vectors: np.ndarray) -> np.ndarray:
        similarity = vectors @ vectors.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :10]

    expected, found = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(expected, found)]))


def _process_peak(runtime: str, model: str, photos: Path) -> dict[str, object]:
    finished = subprocess.run([sys.executable, "-c", _EMBED_PHOTOS, runtime, model, str(photos)], capture_output=True,
                              text=True, timeout=3600, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _ceiling_figure(results: Results, size: BenchSize, torch_model: object, input_size: int, rates: dict[str, float],
                    threads: int) -> None:
    """How close each float32 runtime comes to the most this CPU allows (imgembed.bench.ceiling)."""
    products = matrix_product_rates(threads, rounds=size.repeats, seconds=size.raw_seconds / 4)
    flops = flops_per_image(torch_model.model, input_size)  # type: ignore[attr-defined]
    most = max(products.values()) * 1e9 / flops
    ceiling = {"matrix_product_gflop_per_s": products, "gflop_per_image": flops / 1e9, "most_images_per_s": most,
               "share_of_most": {name: rates[name] / most for name in ("torch", "onnx")}}
    results.add("runtime_float32_ceiling", ceiling,
                f"- (8) float32 ceiling: a {SIDE}-cubed matrix product runs at {products['torch']:.0f} GFLOP/s on "
                f"PyTorch and {products['onnx']:.0f} on ONNX Runtime; at {flops / 1e9:.3g} GFLOP an image, no float32 "
                f"runtime passes {most:.1f} images/s here, {most / rates['torch']:.2f}x PyTorch's. PyTorch runs at "
                f"{rates['torch'] / most:.0%} of it, ONNX Runtime at {rates['onnx'] / most:.0%}")


def runtime_figures(results: Results, settings: Settings, size: BenchSize, model: str, photos: Path) -> None:
    """(8), measured in this process and two helpers; writes its lines to ``results``."""
    import torch

    from imgembed.images.decode import decode_image
    from imgembed.models.names import parse_model_spec
    from imgembed.worker.onnx.model import load_onnx_model
    from imgembed.worker.pytorch.embedding import load_model

    spec = parse_model_spec(model)
    torch_model = load_model(spec, "cpu", tower="image", model_dir=settings.models_path)
    fp32 = load_onnx_model(spec, "image", settings.with_overrides(onnx_quantize="none"))
    int8 = load_onnx_model(spec, "image", settings.with_overrides(onnx_quantize="int8"))  # this CPU's weights
    other_bits = 7 if int8.int8_bits == 8 else 8  # the other int8 weights: their agreement is measured too
    int8_other = load_onnx_model(spec, "image", settings.with_overrides(onnx_quantize="int8"), int8_bits=other_bits)
    batch = settings.batch_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, fp32.input_size, fp32.input_size), dtype=np.float32)
    tensor = torch.from_numpy(pixels)
    runs: dict[str, tuple[object, object]] = {"torch": (torch_model.embed_pixels, tensor),
                                              "onnx": (fp32.embed_pixels, pixels), "onnx_int8": (int8.embed_pixels, pixels)}
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(size.repeats):  # the runtimes in turn, so that the machine's drift touches each alike
        for name, (embed, batch_pixels) in runs.items():
            measured[name].append(images_per_s(embed, batch_pixels, len(batch_pixels), size.raw_images,  # type: ignore[arg-type]
                                                size.raw_seconds))
    rates = {name: statistics.median(values) for name, values in measured.items()}
    results.add("runtime_images_per_s", rates,
                f"- (8) {model} image tower alone, {batch} images per pass, {torch.get_num_threads()} threads: PyTorch "
                f"{rates['torch']:.1f} images/s, ONNX Runtime {rates['onnx']:.1f} ({rates['onnx'] / rates['torch']:.2f}x), "
                f"ONNX Runtime int8 ({int8.int8_bits}-bit weights, as this CPU runs them) {rates['onnx_int8']:.1f} "
                f"({rates['onnx_int8'] / rates['torch']:.2f}x)")
    _ceiling_figure(results, size, torch_model, fp32.input_size, rates, torch.get_num_threads())

    pictures = [decode_image(path.read_bytes(), settings, target_size=fp32.input_size) for path in photo_files(photos)]
    prepared = [fp32.prepare(picture) for picture in pictures]
    exact = np.concatenate([fp32.embed_images(prepared[i:i + batch]) for i in range(0, len(prepared), batch)])
    reference = np.concatenate([torch_model.embed_images([torch_model.prepare(p) for p in pictures[i:i + batch]])
                                for i in range(0, len(pictures), batch)])
    agreement: dict[str, object] = {"onnx_min_cosine": float((exact * reference).sum(axis=1).min()),
                                    "photos": len(pictures)}
    said = []
    for quantized_model in sorted((int8, int8_other), key=lambda each: each.int8_bits or 0, reverse=True):
        quantized = np.concatenate([quantized_model.embed_images(prepared[i:i + batch])
                                    for i in range(0, len(prepared), batch)])
        mean_cosine, recall = float((quantized * exact).sum(axis=1).mean()), _recall_at_10(exact, quantized)
        agreement[f"int8_{quantized_model.int8_bits}bit"] = {"mean_cosine": mean_cosine, "recall_at_10": recall}
        said.append(f"{quantized_model.int8_bits}-bit weights cosine {mean_cosine:.5f} on average, recall@10 of "
                    f"their neighbours {recall:.3f}")
    results.add("runtime_agreement", agreement,
                f"- (8) over {len(pictures)} photos: ONNX Runtime against PyTorch, cosine at least "
                f"{agreement['onnx_min_cosine']:.7f}; int8 against float32: {'; '.join(said)}")

    peaks = {runtime: _process_peak(runtime, model, photos) for runtime in ("onnx", "torch")}
    results.add("runtime_process_rss_mb", peaks,
                f"- (8) a process that loads the image tower and embeds the photos, peak RSS: ONNX Runtime "
                f"{peaks['onnx']['peak_rss_mb']:.0f} MB (PyTorch loaded: {peaks['onnx']['torch_loaded']}), PyTorch "
                f"{peaks['torch']['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    """(8) alone, without the embedded services: `python -m imgembed.bench.runtimes` (what
    bench/gpu_check.sh runs on a GPU machine's CPUs, where only these wheels travel)."""
    import argparse

    from imgembed.bench.machine import git_revision, machine_description
    from imgembed.bench.photos import generated_photos
    from imgembed.bench.results import BenchSize, write_results
    from imgembed.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m imgembed.bench.runtimes",
                                     description="Figure (8): PyTorch against ONNX Runtime on this machine's CPUs.")
    parser.add_argument("--model", default="ViT-B-32", help="model to measure (default ViT-B-32, random weights)")
    parser.add_argument("--photos", type=Path, help="folder of *.JPEG photos (default: generated ones)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/RESULTS-runtimes.md"), help="where to write the figures")
    parser.add_argument("--repeats", type=int, default=BenchSize().repeats, help="runs of each speed figure (median)")
    parser.add_argument("--images", type=int, default=BenchSize().raw_images,
                        help="images each speed run embeds at least (fewer for large models on few cores)")
    arguments = parser.parse_args(argv)
    settings = load_settings()
    photos = arguments.photos or settings.data_dir / "bench-photos"
    if arguments.photos is None:
        generated_photos(photos)
    results = Results()
    results.lines += ["# imgembed benchmark: runtimes", "", f"`python -m imgembed.bench.runtimes --model {arguments.model}`"
                      f" at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_revision()}.", "",
                      *machine_description(),
                      f"- photos: {len(photo_files(photos))} JPEGs from {photos}", "", "## Figures", ""]
    size = BenchSize(repeats=arguments.repeats, raw_images=arguments.images)
    results.lines.insert(3, f"`--repeats {size.repeats} --images {size.raw_images}`: each speed figure is the median "
                            f"of {size.repeats} runs of at least {size.raw_images} images and {size.raw_seconds:.0f} s.")
    runtime_figures(results, settings, size, arguments.model, photos)
    write_results(results, arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
