"""Commands that run imgembed's processes: dispatch, worker, and up (everything, locally)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from imgembed.cli.common import add_command, interrupt_on_sigterm
from imgembed.settings import Settings, require_database_url

log = logging.getLogger("imgembed")


def dispatch(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed import metrics
    from imgembed.celery_app import create_celery_app
    from imgembed.dispatcher import Dispatcher

    require_database_url(settings)
    registry = metrics.serve(settings, "dispatcher")
    dispatcher = Dispatcher(settings, create_celery_app(settings),
                            metrics.DispatcherMetrics(registry) if registry is not None else None)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping dispatcher", signum)
        dispatcher.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dispatcher.run()
    return 0


def worker(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.worker.process import run_worker

    run_worker(settings, preload=args.preload)
    return 0


def _say_if_the_model_cannot_load(settings: Settings) -> None:
    """Before anything starts: one line when the configured model's weights cannot be had here."""
    from imgembed.models.names import parse_model_spec
    from imgembed.worker.pytorch.weights import weights_problem

    problem = weights_problem(parse_model_spec(settings.model), settings.models_path)
    if problem:
        print(f"imgembed up: {problem}. Rows will wait until it loads.", file=sys.stderr)


def _say_which_tables_keep_another_model(settings: Settings) -> None:
    """A changed IMGEMBED_MODEL is the default of new watches only: say how existing tables move."""
    from imgembed.db import connect
    from imgembed.models.registry import tables_on_other_models

    with connect(settings.database_url or "") as connection:
        others = tables_on_other_models(connection, settings.model)
    for table, model in others:
        print(f"  {table} keeps its model {model}; to move it to {settings.model}: imgembed models add "
              f"{settings.model} --table {table} --wait, then imgembed models use {table} {settings.model}, "
              f"then imgembed models drop {model} --table {table}")


def up(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.local.record import clear_record, write_record
    from imgembed.local.stack import local_stack

    interrupt_on_sigterm()
    _say_if_the_model_cannot_load(settings)
    with local_stack(settings) as stack:
        write_record(settings.data_dir, stack.settings.database_url or "", stack.settings.redis_url or "")
        print(f"imgembed is up.\n  DATABASE_URL={stack.settings.database_url}\n  REDIS_URL={stack.settings.redis_url}")
        print(f"  model: {stack.settings.model}\nConnect with: imgembed psql\n"
              "Other imgembed commands on this host find it by themselves. Ctrl-C stops everything.")
        _say_which_tables_keep_another_model(stack.settings)
        try:
            while not (dead := stack.exited()):
                time.sleep(1)
            print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping...", file=sys.stderr)
        finally:
            clear_record(settings.data_dir)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "dispatch", dispatch,
                "Run a dispatcher: LISTEN for new jobs, recover expired leases, send Celery tasks.")
    command = add_command(commands, "worker", worker, "Run a Celery worker that embeds images (GPU when available).")
    command.add_argument("--no-preload", dest="preload", action="store_false",
                         help="load models on the first task instead of at start")
    add_command(commands, "up", up, "Start everything missing (embedded PostgreSQL, Redis), migrate, and run a "
                "dispatcher and a worker in the foreground. Ctrl-C stops it all.")
