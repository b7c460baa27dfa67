"""`imgembed bench`: measure throughput, latency, trigger cost, search speed and memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgembed.cli.common import UsageError, add_command
from imgembed.settings import Settings


def _figures(text: str | None) -> tuple[int, ...]:
    from imgembed.bench.results import FIGURES

    if text is None:
        return FIGURES
    try:
        figures = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        figures = ()
    if not figures or not set(figures) <= set(FIGURES):
        raise UsageError(f"--figures {text!r}: give numbers among 1-6, 8 and 9, separated by commas")
    return figures


def bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.models is not None:
        return _model_table(args)
    if args.reduce is not None:
        return _reductions(settings, args)
    figures = _figures(args.figures)
    from imgembed.bench.photos import generated_photos, photo_files
    from imgembed.bench.results import SMOKE, BenchSize
    from imgembed.bench.run import run_bench

    if args.photos:
        photos = Path(args.photos).resolve()  # the workers read the files by absolute path
        if set(figures) & {2, 3, 9} and not photo_files(photos):
            raise UsageError(f"--photos {photos}: no *.JPEG files there")
        note = f"{len(photo_files(photos))} JPEGs from {photos}"
    else:
        photos = settings.data_dir / "bench-photos"
        note = f"{len(generated_photos(photos))} generated 500x375 JPEGs (no --photos given)"
    device = args.device or ("cuda" if settings.device.startswith("cuda") else "cpu")
    run_bench(settings, size=SMOKE if args.smoke else BenchSize(), model=args.model,
              out=Path(args.out or "docs/results/RESULTS.md"), photos=photos, photos_note=note, device=device, figures=figures)
    return 0


def _model_table(args: argparse.Namespace) -> int:
    from imgembed.bench.model_table import DEFAULT_MODELS, model_table
    from imgembed.bench.results import SMOKE, BenchSize
    from imgembed.models.names import ModelSpecError, embedding_dimension, parse_model_spec

    models = [name.strip() for name in args.models.split(",") if name.strip()] or list(DEFAULT_MODELS)
    for name in models:
        try:
            embedding_dimension(parse_model_spec(name))
        except ModelSpecError as error:
            raise UsageError(f"--models: {error}") from error
    model_table(models, SMOKE if args.smoke else BenchSize(), Path(args.out or "docs/models.md"))
    return 0


def _reductions(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.bench.photos import photo_files
    from imgembed.bench.reduction_figures import reduction_figures

    try:
        dims = tuple(int(part) for part in args.reduce.split(","))
    except ValueError:
        raise UsageError(f"--reduce {args.reduce!r}: give dimensions separated by commas, e.g. 256,128,64") from None
    if not args.photos or not photo_files(Path(args.photos)):
        raise UsageError("--reduce varies real photos: give --photos FOLDER holding *.JPEG files")
    photos = Path(args.photos).resolve()
    rows = args.rows or (200 if args.smoke else 3000)
    reduction_figures(settings, model=args.model, dims=dims, rows=rows, queries=5 if args.smoke else 100,
                      photos=photos, out=Path(args.out or "docs/results/RESULTS-reduce.md"))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "bench", bench, "Measure throughput, latency, trigger cost, search speed and "
                          "memory on the embedded services; write the figures to docs/results/RESULTS.md.")
    command.add_argument("--model", default="ViT-B-32", help="model to measure (default ViT-B-32 with random weights)")
    command.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu unless IMGEMBED_DEVICE names cuda")
    command.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark runs")
    command.add_argument("--figures", default=None,
                         help="which figures to measure (default all): 1 raw model, 2 end to end, 3 latency, "
                              "4 triggers, 5 search, 6 memory (needs 2 or 3), 8 PyTorch against ONNX Runtime, 9 repeated "
                              "images embedded once; with "
                              "--device cuda, GPU memory and use come with 2")
    command.add_argument("--photos", help="folder of *.JPEG photos for (2), (3) and (9) (default: photo-sized JPEGs "
                         "generated in IMGEMBED_DATA_DIR)")
    command.add_argument("--models", nargs="?", const="", metavar="NAME,...",
                         help="instead of the figures, the model table: dimension, parameters, GFLOPs, images/s on "
                              "the CPU, peak memory and text for each model (default: the classic backbones from "
                              "timm, ViT-B-32, ViT-L-14 and MobileCLIP-S2), written to docs/models.md")
    command.add_argument("--reduce", nargs="?", const="256,128,64", metavar="DIMS,...",
                         help="instead of the figures, reduced models (imgembed.reduce) of --model to these dimensions "
                              "(default 256,128,64): variance kept, recall@10 against the full model, search time, "
                              "index size; written to docs/results/RESULTS-reduce.md")
    command.add_argument("--rows", type=int, help="rows embedded for --reduce (default 3000: varied crops of --photos)")
    command.add_argument("--out", help="where to write the results (default docs/results/RESULTS.md, docs/models.md with "
                         "--models, docs/results/RESULTS-reduce.md with --reduce)")
