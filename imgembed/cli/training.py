"""`imgembed finetune`: fine-tune an OpenCLIP model on image+caption pairs, or train a small one."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgembed.cli.common import UsageError, add_command
from imgembed.settings import Settings, require_database_url


def _pairs(settings: Settings, args: argparse.Namespace) -> list[object]:
    from imgembed.training import finetune

    if args.csv:
        return finetune.pairs_from_csv(Path(args.csv))  # type: ignore[return-value]
    if args.table:
        if not (args.image_column and args.text_column):
            raise UsageError("--table needs --image-column and --text-column")
        from imgembed.db import connect

        with connect(require_database_url(settings)) as connection:
            return finetune.pairs_from_table(connection, args.table, args.image_column, args.text_column)  # type: ignore[return-value]
    if args.synthetic:
        return finetune.synthetic_pairs(args.synthetic, seed=args.seed)  # type: ignore[return-value]
    raise UsageError("give --csv FILE, --table TABLE or --synthetic N")


def _self_supervised(settings: Settings, args: argparse.Namespace) -> int:
    """--self-supervised: SimCLR on the images alone; labels, if named, only measure."""
    from imgembed.training import self_supervised

    if args.csv or args.text_column:
        raise UsageError("--self-supervised trains on images alone: give --table with --image-column "
                         "(and --label-column to measure), or --synthetic N")
    if args.table:
        if not args.image_column:
            raise UsageError("--table needs --image-column")
        from imgembed.db import connect

        with connect(require_database_url(settings)) as connection:
            table = connection.execute("SELECT %s::regclass::text", (args.table,)).fetchone()[0]  # type: ignore[index]
            pictures, skipped = self_supervised.pictures_from_table(connection, table, args.image_column,
                                                                    args.label_column, settings)
    elif args.synthetic:
        from imgembed.training.synthetic import random_shapes

        pictures = [self_supervised.Picture(shape.image, shape.shape)
                    for shape in random_shapes(args.synthetic, seed=args.seed)]
        skipped = None
    else:
        raise UsageError("give --table TABLE --image-column C, or --synthetic N")
    model_name = args.model or settings.model
    left_out = f" ({sum(skipped.values())} unreadable: {dict(skipped)})" if skipped else ""
    print(f"{len(pictures)} images{left_out}; self-supervised tuning of {model_name.split(':')[0] if args.from_scratch else model_name}")
    result = self_supervised.tune(
        pictures, settings, model_name=model_name, from_scratch=args.from_scratch, out=Path(args.out),
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, holdout=args.holdout, seed=args.seed)
    print(f"held-out kNN label accuracy (k={self_supervised.KNN_K}): "
          f"{self_supervised.nan_or(result.knn_accuracy_before)} -> {self_supervised.nan_or(result.knn_accuracy_after)}")
    steps = max(1, len(result.losses) // max(1, args.epochs))  # the mean of the first and last epochs: steps vary
    first, last = result.losses[:steps], result.losses[-steps:]
    print(f"loss (mean of an epoch): first {sum(first) / len(first):.3f} -> last {sum(last) / len(last):.3f}; "
          f"checkpoint: {result.checkpoint}")
    _register(settings, args, model_name, result.checkpoint)
    return 0


def _register(settings: Settings, args: argparse.Namespace, model_name: str, checkpoint: Path) -> None:
    if not args.register:
        return
    from imgembed.db import connect
    from imgembed.models.registry import register_model

    name = f"{model_name.split(':')[0]}:{checkpoint.resolve()}"
    with connect(require_database_url(settings)) as connection:
        register_model(connection, name)
    print(f"registered as model {name}")


def finetune_command(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.training import finetune

    if args.self_supervised:
        return _self_supervised(settings, args)
    pairs = _pairs(settings, args)
    model_name = args.model or settings.model
    doing = f"training {model_name.split(':')[0]} from scratch" if args.from_scratch else f"fine-tuning {model_name}"
    print(f"{len(pairs)} image+caption pairs; {doing}")
    result = finetune.finetune(
        pairs, settings, model_name=model_name, from_scratch=args.from_scratch, out=Path(args.out),  # type: ignore[arg-type]
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, holdout=args.holdout, seed=args.seed,
    )
    if result.skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in result.skipped.most_common())
        print(f"skipped {sum(result.skipped.values())} pairs whose image could not be read ({reasons}); "
              "each is named above")
    before, after = result.recall_before, result.recall_after
    print(f"held-out image->text recall@1: {before['recall@1']:.3f} -> {after['recall@1']:.3f}   "
          f"recall@5: {before['recall@5']:.3f} -> {after['recall@5']:.3f}")
    print(f"loss: {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; checkpoint: {result.checkpoint}")
    _register(settings, args, model_name, result.checkpoint)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "finetune", finetune_command, "Fine-tune an OpenCLIP model on image+caption "
                          "pairs (contrastive loss), or train a small architecture from scratch; with "
                          "--self-supervised, tune its image tower on images alone (SimCLR).")
    command.add_argument("--self-supervised", action="store_true",
                         help="no captions: two augmented views of each image (SimCLR); prints a held-out kNN label "
                              "accuracy before and after when --label-column names labels (--synthetic: the shapes)")
    command.add_argument("--label-column", help="with --self-supervised: labels that only measure (kNN accuracy)")
    source = command.add_mutually_exclusive_group()
    source.add_argument("--csv", help="CSV with path and caption columns")
    source.add_argument("--table", help="table with an image column and a text column")
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated images of coloured shapes with captions")
    command.add_argument("--image-column", help="image column of --table (bytea or path/URI text)")
    command.add_argument("--text-column", help="caption column of --table")
    command.add_argument("--model", help="model to start from (default IMGEMBED_MODEL); with --from-scratch, "
                         "its architecture")
    command.add_argument("--from-scratch", action="store_true", help="random initial weights (small architectures)")
    command.add_argument("--epochs", type=int, default=5, help="passes over the training pairs (default 5)")
    command.add_argument("--batch-size", type=int, default=128, help="pairs per step (default 128)")
    command.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5; ~2e-3 from scratch)")
    command.add_argument("--holdout", type=float, default=0.1, help="fraction held out for recall@1/5, or kNN accuracy "
                         "(default 0.1)")
    command.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffles and generated data")
    command.add_argument("--out", default="finetuned.pt", help="checkpoint file to write (default finetuned.pt)")
    command.add_argument("--register", action="store_true", help="register the checkpoint as a model in DATABASE_URL")
