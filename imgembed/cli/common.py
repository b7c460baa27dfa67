"""What every command shares: how a command is declared, logging, and stopping on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable

from imgembed.errors import ImgembedError
from imgembed.settings import Settings, environment_help

Handler = Callable[[Settings, argparse.Namespace], int]


class UsageError(ImgembedError, ValueError):
    """The command was given arguments it cannot use: said in one line, exit status 2."""


def add_command(commands: argparse._SubParsersAction, name: str, handler: Handler,
                help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and lists the environment it reads."""
    command = commands.add_parser(name, help=help_text, description=help_text, epilog=environment_help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.set_defaults(handler=handler)
    return command


# Loggers whose INFO lines are imgembed's own story (batches, claims, loads, services); the
# libraries' INFO lines (OpenCLIP's configuration notes, Alembic's steps...) stay out.
OWN_LOGGERS = ("imgembed", "celery")


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=max(logging.WARNING, logging.getLevelName(settings.log_level)),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so `up` and `demo` clean up when a supervisor stops them."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
