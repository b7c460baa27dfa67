"""`imgembed models`: list, add (backfill), switch and drop embedding models; pull and import weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import psycopg

from imgembed.cli.common import UsageError, add_command
from imgembed.models.names import parse_model_spec
from imgembed.settings import Settings, require_database_url


def _list(connection: psycopg.Connection, args: argparse.Namespace) -> None:
    from imgembed.models.registry import list_models
    from imgembed.report import format_table

    print(format_table(["model", "architecture", "weights", "dim", "default", "tables (* = table default)"],
                       list_models(connection)))


def _add(connection: psycopg.Connection, args: argparse.Namespace) -> None:
    from imgembed.models.registry import image_tables, register_model, wait_for_backfill

    register_model(connection, args.name, make_default=args.default, model_dir=args.settings.models_path)
    tables = args.table or image_tables(connection)
    for table in tables:
        connection.execute("SELECT imgembed.add_model(%s::regclass, %s)", (table, args.name))
    print(f"{args.name} registered; backfilling {', '.join(tables) or 'no table'}")
    if args.wait and tables:
        wait_for_backfill(connection, args.name, tables)


def _use(connection: psycopg.Connection, args: argparse.Namespace) -> None:
    connection.execute("SELECT imgembed.use_model(%s::regclass, %s, %s)", (args.table, args.name, args.force))
    print(f"{args.table} now answers with {args.name}")


def _drop(connection: psycopg.Connection, args: argparse.Namespace) -> None:
    if args.table:
        for table in args.table:
            connection.execute("SELECT imgembed.drop_model(%s::regclass, %s)", (table, args.name))
    else:
        connection.execute("SELECT imgembed.forget_model(%s)", (args.name,))
    print(f"dropped {args.name}" + (f" from {', '.join(args.table)}" if args.table else " everywhere"))


def _reduce(connection: psycopg.Connection, args: argparse.Namespace) -> None:
    (name,) = connection.execute(
        "SELECT imgembed.reduce(%s::regclass, %s, %s, %s, %s)",
        (args.table, args.model, args.dims, args.name, args.sample_rows)).fetchone()  # type: ignore[misc]
    print(f"{name}: {args.dims} dimensions of {args.table}'s vectors, fitted by a worker")
    if not args.wait:
        return
    from imgembed.models.registry import wait_for_fit

    fitted_rows, kept = wait_for_fit(connection, name, args.timeout)
    print(f"fitted on {fitted_rows} vectors; the {args.dims} dimensions keep {kept:.1%} of their variance.\n"
          f"Search with model => '{name}', or make it the default: imgembed models use {args.table} {name}")


ACTIONS = {"list": _list, "add": _add, "use": _use, "drop": _drop, "reduce": _reduce}


def _pull(settings: Settings, args: argparse.Namespace) -> None:
    """Download a pretrained model's weights once into the model directory."""
    try:
        from imgembed.worker.pull import pull
    except ImportError as error:
        raise UsageError(f"pulling weights needs OpenCLIP: pip install 'imgembed[worker]' ({error})") from None
    stored = pull(parse_model_spec(args.name), settings.models_path)
    print(f"{stored.name}: {stored.path} (sha256 {stored.sha256[:12]}...)\nCopy {settings.models_path} to hosts "
          "without internet and set IMGEMBED_MODEL_DIR there: their workers load it from the directory.")


def _import(settings: Settings, args: argparse.Namespace) -> None:
    """Keep a local checkpoint in the model directory under an ARCH:TAG name."""
    from imgembed.models.store import add_checkpoint

    stored = add_checkpoint(settings.models_path, parse_model_spec(args.name), Path(args.file).expanduser(),
                            source=f"imported from {Path(args.file).expanduser().resolve()}")
    print(f"{stored.name}: {stored.path} (sha256 {stored.sha256[:12]}...)\nWorkers whose IMGEMBED_MODEL_DIR is "
          f"{settings.models_path} load {stored.name} from it; use it with `imgembed models add {stored.name}`.")


def _export(settings: Settings, args: argparse.Namespace) -> None:
    """Export a model's towers to ONNX into the model directory, as a CPU worker would on first use."""
    from imgembed.worker.onnx.cache import OnnxUnsupported, exported_tower

    spec = parse_model_spec(args.name)
    quantize = "int8" if args.int8 else settings.onnx_quantize
    for tower in args.tower or ["image", "text"]:
        try:
            folder, manifest = exported_tower(spec, tower, settings.models_path, quantize)
        except OnnxUnsupported as error:
            raise UsageError(f"{spec.name}: its {tower} tower cannot run on ONNX Runtime ({error}); its workers use "
                             "PyTorch") from None
        int8 = "".join(f", int8 {bits}-bit agreement {variant['agreement']:.6f}"
                       for bits, variant in manifest.get("int8", {}).items())
        print(f"{spec.name} ({tower} tower): {folder} (agreement with PyTorch {manifest['agreement']:.7f}{int8})")
    print(f"CPU workers whose IMGEMBED_MODEL_DIR is {settings.models_path} run it on ONNX Runtime at once.")


def _prune_exports(settings: Settings, args: argparse.Namespace) -> None:
    """Remove the ONNX exports no current model, checkpoint and export format maps to."""
    from imgembed.worker.onnx.prune import remove_export, stale_exports

    stale = stale_exports(settings.models_path)
    if not stale:
        print(f"no stale ONNX exports in {settings.models_path / 'onnx'}")
        return
    freed = 0
    for export in stale:
        size = f"{export.size_bytes / 1e6:,.0f} MB"
        if args.dry_run:
            print(f"would remove {export.folder} ({export.model}, {size})")
        elif remove_export(export.folder):
            freed += export.size_bytes
            print(f"removed {export.folder} ({export.model}, {size})")
        else:
            print(f"left {export.folder} ({export.model}, {size}): another process holds its lock")
    if not args.dry_run:
        print(f"freed {freed / 1e6:,.0f} MB")


WITHOUT_DATABASE = {"pull": _pull, "import": _import, "export": _export, "prune-exports": _prune_exports}


def models(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect

    if args.models_command in WITHOUT_DATABASE:
        WITHOUT_DATABASE[args.models_command](settings, args)
        return 0
    args.settings = settings
    with connect(require_database_url(settings)) as connection:
        ACTIONS[args.models_command](connection, args)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "models", models, "List, add (backfill), switch, reduce and drop embedding models; "
                          "pull and import their weights for hosts without internet; export them to ONNX.")
    actions = command.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="registered models and their tables' progress")
    action = actions.add_parser(
        "add", help="register a model and backfill tables with it while the current default keeps answering")
    action.add_argument("name", help="ARCH:TAG, ARCH:/path/to/checkpoint.pt, imgembed-tiny or imgembed-shapes")
    action.add_argument("--table", action="append", help="table to backfill (repeatable; default: every watched table)")
    action.add_argument("--default", action="store_true", help="make it the default for tables watched from now on")
    action.add_argument("--wait", action="store_true", help="wait for the backfill, with a progress bar")
    action = actions.add_parser("use", help="switch a table's default model (atomic)")
    action.add_argument("table")
    action.add_argument("name")
    action.add_argument("--force", action="store_true", help="switch even though the backfill is incomplete")
    action = actions.add_parser("drop", help="drop a model's vectors (from --table, or everywhere)")
    action.add_argument("name")
    action.add_argument("--table", action="append", help="only from this table (repeatable)")
    action = actions.add_parser(
        "reduce", help="fewer dimensions for a table's vectors: PCA fitted by a worker, kept as a model of its own "
                       "(its own index) that follows every row")
    action.add_argument("table")
    action.add_argument("--dims", type=int, default=128, help="dimensions to keep (default 128)")
    action.add_argument("--model", help="model whose vectors to reduce (default: the table's default)")
    action.add_argument("--name", help="the reduced model's name (default MODEL@pcaDIMS)")
    action.add_argument("--sample-rows", type=int, default=100000,
                        help="fit on at most this many of the table's vectors (default 100000)")
    action.add_argument("--wait", action="store_true", help="wait for the fit and print what it keeps")
    action.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")
    action = actions.add_parser("pull", help="download a pretrained model's weights once into IMGEMBED_MODEL_DIR "
                                "(progress bar); workers then load it without the network")
    action.add_argument("name", help="ARCH:TAG, e.g. ViT-B-32:laion2b_s34b_b79k (see open_clip.list_pretrained())")
    action = actions.add_parser("import", help="keep a local checkpoint in IMGEMBED_MODEL_DIR under an ARCH:TAG name")
    action.add_argument("file", help="the checkpoint (.pt, .bin or .safetensors) to copy in")
    action.add_argument("--name", required=True, help="ARCH:TAG it answers to, e.g. ViT-B-32:laion2b_s34b_b79k")
    action = actions.add_parser("export", help="export a model's towers to ONNX into IMGEMBED_MODEL_DIR (needs "
                                "PyTorch here; workers then need only onnxruntime)")
    action.add_argument("name", help="ARCH:TAG, ARCH:/path/to/checkpoint.pt, imgembed-tiny or imgembed-shapes")
    action.add_argument("--tower", action="append", choices=["image", "text"], help="only this tower (repeatable)")
    action.add_argument("--int8", action="store_true", help="also the int8 weights (IMGEMBED_ONNX_QUANTIZE=int8)")
    action = actions.add_parser(
        "prune-exports", help="remove ONNX exports in IMGEMBED_MODEL_DIR that no current model, checkpoint or export "
                              "format maps to (left by upgrades and replaced checkpoints)")
    action.add_argument("--dry-run", action="store_true", help="only list what would be removed")
