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


def finetune_command(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.training import finetune

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
    if args.register:
        from imgembed.db import connect
        from imgembed.models.registry import register_model

        name = f"{model_name.split(':')[0]}:{result.checkpoint.resolve()}"
        with connect(require_database_url(settings)) as connection:
            register_model(connection, name)
        print(f"registered as model {name}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    command = add_command(commands, "finetune", finetune_command, "Fine-tune an OpenCLIP model on image+caption "
                          "pairs (contrastive loss), or train a small architecture from scratch.")
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
    command.add_argument("--holdout", type=float, default=0.1, help="fraction held out for recall@1/5 (default 0.1)")
    command.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffles and generated data")
    command.add_argument("--out", default="finetuned.pt", help="checkpoint file to write (default finetuned.pt)")
    command.add_argument("--register", action="store_true", help="register the checkpoint as a model in DATABASE_URL")
