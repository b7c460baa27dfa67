"""The ``imgembed`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

from worker.settings import Settings, SettingsError, load_settings, require_database_url

log = logging.getLogger("imgembed")

ENVIRONMENT_HELP = """\
environment:
  DATABASE_URL              PostgreSQL with pgvector (unset: `up`/`demo` start an embedded one)
  REDIS_URL                 Redis for Celery (unset: `up`/`demo` start a private redis-server)
  IMGEMBED_MODEL            OpenCLIP model: ARCH:TAG, ARCH:/path/to/checkpoint, or imgembed-tiny
                            (default ViT-B-32:laion2b_s34b_b79k)
  IMGEMBED_DEVICE           auto | cpu | cuda[:N]         IMGEMBED_BATCH_SIZE  jobs per claim (32)
  IMGEMBED_QUEUE            Celery queue name (imgembed)  IMGEMBED_LEASE_SECONDS  job lease (300)
  IMGEMBED_MAX_ATTEMPTS     tries before a job fails (5)  IMGEMBED_SWEEP_SECONDS  dispatcher sweep (2)
  IMGEMBED_FORWARD_BATCH, IMGEMBED_WORKER_THREADS, IMGEMBED_DECODE_THREADS, IMGEMBED_JPEG_DECODE,
  IMGEMBED_MALLOC_ARENAS, IMGEMBED_MAX_IN_FLIGHT, IMGEMBED_MAX_PIXELS, IMGEMBED_MAX_IMAGE_BYTES,
  IMGEMBED_ALLOWED_ROOTS, IMGEMBED_ALLOW_HTTP, IMGEMBED_HTTP_ALLOW_PRIVATE, IMGEMBED_DATA_DIR,
  IMGEMBED_LOG_LEVEL: see README.md (Configuration)
"""


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker import migrate

    url = require_database_url(settings)
    if args.downgrade:
        migrate.downgrade(url, args.downgrade, sql_only=args.sql)
        if not args.sql:
            print(f"imgembed downgraded to {args.downgrade}")
        return 0
    migrate.upgrade(url, args.revision, sql_only=args.sql)
    if args.sql:
        return 0
    from worker.models import default_model, register_model
    from worker.db import connect

    with connect(url) as connection:
        if not args.no_model:
            register_model(connection, settings.model)
        print(f"imgembed migrated to {migrate.current_revision(url)}; default model: {default_model(connection)}")
    return 0


def cmd_dispatch(settings: Settings, args: argparse.Namespace) -> int:
    from worker.celery_app import create_celery_app
    from worker.dispatcher import Dispatcher

    require_database_url(settings)
    dispatcher = Dispatcher(settings, create_celery_app(settings))

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping dispatcher", signum)
        dispatcher.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dispatcher.run()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.memory import limit_malloc_arenas
    from worker.openmp import use_wait_policy

    limit_malloc_arenas(settings.malloc_arenas)  # before any thread starts
    use_wait_policy(settings.openmp_wait_policy)  # before torch is imported
    from worker.celery_app import create_celery_app, register_worker_tasks

    require_database_url(settings)
    from worker.heartbeat import start_heartbeat
    from worker.tasks import runtime

    app = create_celery_app(settings)
    register_worker_tasks(app)
    if args.preload:
        from worker.embedding import ModelLoadError

        try:
            runtime().batcher(settings.model, "image")
        except ModelLoadError as error:
            log.warning("%s; jobs for it will fail with this reason until it loads", error)
    name = f"imgembed-{os.getpid()}@{socket.gethostname()}"
    stop_beating = start_heartbeat(runtime(), name, require_database_url(settings))
    try:
        run_celery_worker(app, [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_threads}",
            f"--queues={settings.queue}",
            f"--loglevel={settings.log_level}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
        ])
    finally:
        stop_beating.set()
    return 0


def run_celery_worker(app: object, argv: list[str], backoff_seconds: float = 2.0) -> None:
    """Run Celery's worker until a signal asks it to stop. Celery can stop on its own after broker
    trouble (an 'Unrecoverable error' inside kombu while Redis restarts): then it starts again in
    this process, with the models still loaded. Jobs of the lost messages come back by lease."""
    from celery import signals
    from celery.worker import state

    asked_to_stop = threading.Event()
    signals.worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)
    while True:
        try:
            app.worker_main(argv)  # type: ignore[attr-defined]
        except SystemExit:
            pass
        if asked_to_stop.is_set():
            return
        log.error("the Celery worker stopped without being asked to (broker trouble?); starting it again in %.0fs",
                  backoff_seconds)
        state.should_stop = state.should_terminate = None
        time.sleep(backoff_seconds)


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from worker.db import connect

    with connect(require_database_url(settings)) as connection:
        (count,) = connection.execute(
            "SELECT imgembed.retry_failed(%s::regclass, %s)", (args.table, args.reason)
        ).fetchone()  # type: ignore[misc]
    print(f"{count} failed jobs queued again")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from worker.db import connect
    from worker.report import status_report

    with connect(require_database_url(settings)) as connection:
        print(status_report(connection))
    return 0


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so `up` and `demo` clean up when a supervisor stops them."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stack import local_stack

    _interrupt_on_sigterm()
    with local_stack(settings) as stack:
        print(f"imgembed is up.\n  DATABASE_URL={stack.settings.database_url}\n  REDIS_URL={stack.settings.redis_url}")
        print(f"  model: {stack.settings.model}\nConnect with: psql {stack.settings.database_url}\nCtrl-C stops everything.")
        try:
            while not (dead := stack.exited()):
                time.sleep(1)
            print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping...", file=sys.stderr)
    return 0


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from worker.db import connect
    from worker.ingest import ingest_paths

    with connect(require_database_url(settings)) as connection:
        count = ingest_paths(connection, args.paths, as_bytes=args.bytes, label=args.label)
    print(f"ingested {count} images into imgembed.image")
    return 0


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker import search
    from worker.db import connect
    from worker.report import format_table

    with connect(require_database_url(settings)) as connection:
        if args.image:
            hits = search.search_image(connection, args.table, Path(args.image), settings, args.k)
        elif args.like is not None:
            hits = search.search_like(connection, args.table, args.like, args.k)
        elif args.query:
            hits = search.search_text(connection, args.table, args.query, args.k, args.timeout)
        else:
            print("imgembed search: give a text query, --image FILE or --like KEY", file=sys.stderr)
            return 2
    print(format_table(["id", "distance"], [(key, round(distance, 4)) for key, distance in hits]))
    return 0


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from worker import models
    from worker.db import connect
    from worker.report import format_table

    with connect(require_database_url(settings)) as connection:
        if args.models_command == "list":
            rows = models.list_models(connection)
            print(format_table(["model", "architecture", "weights", "dim", "default", "tables (* = table default)"], rows))
        elif args.models_command == "add":
            models.register_model(connection, args.name, make_default=args.default)
            tables = args.table or models.image_tables(connection)
            for table in tables:
                connection.execute("SELECT imgembed.add_model(%s::regclass, %s)", (table, args.name))
            print(f"{args.name} registered; backfilling {', '.join(tables) or 'no table'}")
            if args.wait and tables:
                models.wait_for_backfill(connection, args.name, tables)
        elif args.models_command == "use":
            connection.execute("SELECT imgembed.use_model(%s::regclass, %s, %s)", (args.table, args.name, args.force))
            print(f"{args.table} now answers with {args.name}")
        elif args.models_command == "drop":
            if args.table:
                for table in args.table:
                    connection.execute("SELECT imgembed.drop_model(%s::regclass, %s)", (table, args.name))
            else:
                connection.execute("SELECT imgembed.forget_model(%s)", (args.name,))
            print(f"dropped {args.name}" + (f" from {', '.join(args.table)}" if args.table else " everywhere"))
    return 0


def cmd_finetune(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker import finetune
    from worker.db import connect

    if args.csv:
        pairs = finetune.pairs_from_csv(Path(args.csv))
    elif args.table:
        if not (args.image_column and args.text_column):
            print("imgembed finetune: --table needs --image-column and --text-column", file=sys.stderr)
            return 2
        with connect(require_database_url(settings)) as connection:
            pairs = finetune.pairs_from_table(connection, args.table, args.image_column, args.text_column)
    elif args.synthetic:
        pairs = finetune.synthetic_pairs(args.synthetic, seed=args.seed)
    else:
        print("imgembed finetune: give --csv FILE, --table TABLE or --synthetic N", file=sys.stderr)
        return 2
    model_name = args.model or settings.model
    print(f"{len(pairs)} image+caption pairs; {'training ' + model_name.split(':')[0] + ' from scratch' if args.from_scratch else 'fine-tuning ' + model_name}")
    result = finetune.finetune(
        pairs, settings, model_name=model_name, from_scratch=args.from_scratch, out=Path(args.out),
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, holdout=args.holdout, seed=args.seed,
    )
    before, after = result.recall_before, result.recall_after
    print(f"held-out image->text recall@1: {before['recall@1']:.3f} -> {after['recall@1']:.3f}   "
          f"recall@5: {before['recall@5']:.3f} -> {after['recall@5']:.3f}")
    print(f"loss: {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; checkpoint: {result.checkpoint}")
    if args.register:
        from worker.models import register_model

        name = f"{model_name.split(':')[0]}:{result.checkpoint.resolve()}"
        with connect(require_database_url(settings)) as connection:
            register_model(connection, name)
        print(f"registered as model {name}")
    return 0


def cmd_cluster(settings: Settings, args: argparse.Namespace) -> int:
    from worker.db import connect
    from worker.report import format_table

    with connect(require_database_url(settings)) as connection:
        (run_id,) = connection.execute(
            "SELECT imgembed.cluster(%s::regclass, %s, %s, %s)", (args.table, args.k, args.method, args.model)
        ).fetchone()  # type: ignore[misc]
        print(f"clustering run {run_id} queued")
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.timeout
        while True:
            status, error, k, quality = connection.execute(
                "SELECT status, error, k, quality FROM imgembed.cluster_run WHERE id = %s", (run_id,)).fetchone()  # type: ignore[misc]
            if status in ("done", "failed"):
                break
            if time.monotonic() > deadline:
                print(f"imgembed cluster: run {run_id} still {status} after {args.timeout}s (is a worker running?)",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        if status == "failed":
            print(f"imgembed cluster: run {run_id} failed: {error}", file=sys.stderr)
            return 1
        print(f"run {run_id}: {k} clusters, silhouette {quality if quality is None else round(quality, 3)}")
        rows = connection.execute(
            "SELECT cluster, size, medoid_key, label_mix::text FROM imgembed.cluster_summary WHERE run_id = %s "
            "ORDER BY cluster", (run_id,)).fetchall()
        print(format_table(["cluster", "size", "medoid", "labels"], rows))
    return 0


def cmd_map(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.db import connect
    from worker.mapping import map_table

    out_png = Path(args.out)
    out_html = Path(args.html) if args.html else out_png.with_suffix(".html")
    with connect(require_database_url(settings)) as connection:
        png, page, rows = map_table(connection, args.table, settings, method=args.method, color_by=args.color_by,
                                    out_png=out_png, out_html=out_html, model=args.model)
    print(f"{rows} rows projected with {args.method}; coordinates in imgembed.projection\nPNG: {png}\nHTML: {page}")
    return 0


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.bench import FIGURES, PHOTOS, SMOKE, BenchSize, run_bench

    device = args.device or ("cuda" if settings.device.startswith("cuda") else "cpu")
    try:
        figures = tuple(sorted({int(part) for part in args.figures.split(",")}))
    except ValueError:
        raise SettingsError(f"--figures {args.figures!r}: give numbers from 1 to 6, separated by commas") from None
    if not figures or not set(figures) <= set(FIGURES):
        raise SettingsError(f"--figures {args.figures!r}: give numbers from 1 to 6, separated by commas")
    run_bench(settings, size=SMOKE if args.smoke else BenchSize(), model=args.model, out=Path(args.out), device=device,
              figures=figures, photos=Path(args.photos) if args.photos else PHOTOS)
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    _interrupt_on_sigterm()
    return run_demo(settings, photos_dir=args.photos, generated=args.generated, map_out=args.map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgembed",
        description="Image embeddings inside PostgreSQL: watched tables, Celery workers with OpenCLIP, pgvector.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[Settings, argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=ENVIRONMENT_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    migrate = add("migrate", cmd_migrate, "Install or upgrade imgembed's schema in DATABASE_URL (Alembic), "
                  "and register IMGEMBED_MODEL.")
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead ('base' removes imgembed)")
    migrate.add_argument("--sql", action="store_true", help="print the SQL instead of running it (offline mode)")
    migrate.add_argument("--no-model", action="store_true", help="do not register IMGEMBED_MODEL")

    add("dispatch", cmd_dispatch, "Run a dispatcher: LISTEN for new jobs, recover expired leases, send Celery tasks.")
    worker = add("worker", cmd_worker, "Run a Celery worker that embeds images (GPU when available).")
    worker.add_argument("--no-preload", dest="preload", action="store_false",
                        help="load models on the first task instead of at start")
    add("status", cmd_status, "Print the backlog per watched table and model, throughput, live workers and failures.")
    retry = add("retry", cmd_retry, "Queue failed jobs again (all, one table's, or those whose error contains REASON).")
    retry.add_argument("--table", help="only this watched table")
    retry.add_argument("--reason", help="only failures whose error contains this text")
    add("up", cmd_up, "Start everything missing (embedded PostgreSQL, Redis), migrate, and run a dispatcher "
        "and a worker in the foreground. Ctrl-C stops it all.")
    ingest = add("ingest", cmd_ingest, "Insert image files into imgembed.image (as paths, or as bytes with --bytes).")
    ingest.add_argument("paths", nargs="+", help="image files or directories")
    ingest.add_argument("--bytes", action="store_true", help="store the file contents instead of the path")
    ingest.add_argument("--label", help="label to store with every image")
    models = add("models", cmd_models, "List, add (backfill), switch and drop embedding models.")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_commands.add_parser("list", help="registered models and their tables' progress")
    models_add = models_commands.add_parser(
        "add", help="register a model and backfill tables with it while the current default keeps answering")
    models_add.add_argument("name", help="ARCH:TAG, ARCH:/path/to/checkpoint.pt, imgembed-tiny or imgembed-shapes")
    models_add.add_argument("--table", action="append", help="table to backfill (repeatable; default: every watched table)")
    models_add.add_argument("--default", action="store_true", help="make it the default for tables watched from now on")
    models_add.add_argument("--wait", action="store_true", help="wait for the backfill, with a progress bar")
    models_use = models_commands.add_parser("use", help="switch a table's default model (atomic)")
    models_use.add_argument("table")
    models_use.add_argument("name")
    models_use.add_argument("--force", action="store_true", help="switch even though the backfill is incomplete")
    models_drop = models_commands.add_parser("drop", help="drop a model's vectors (from --table, or everywhere)")
    models_drop.add_argument("name")
    models_drop.add_argument("--table", action="append", help="only from this table (repeatable)")

    tune = add("finetune", cmd_finetune, "Fine-tune an OpenCLIP model on image+caption pairs (contrastive loss), "
               "or train a small architecture from scratch.")
    source = tune.add_mutually_exclusive_group()
    source.add_argument("--csv", help="CSV with path and caption columns")
    source.add_argument("--table", help="table with an image column and a text column")
    source.add_argument("--synthetic", type=int, metavar="N", help="N generated images of coloured shapes with captions")
    tune.add_argument("--image-column", help="image column of --table (bytea or path/URI text)")
    tune.add_argument("--text-column", help="caption column of --table")
    tune.add_argument("--model", help="model to start from (default IMGEMBED_MODEL); with --from-scratch, its architecture")
    tune.add_argument("--from-scratch", action="store_true", help="random initial weights (small architectures)")
    tune.add_argument("--epochs", type=int, default=5)
    tune.add_argument("--batch-size", type=int, default=128)
    tune.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5; ~2e-3 from scratch)")
    tune.add_argument("--holdout", type=float, default=0.1, help="fraction held out for recall@1/5 (default 0.1)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", default="finetuned.pt", help="checkpoint file to write (default finetuned.pt)")
    tune.add_argument("--register", action="store_true", help="register the checkpoint as a model in DATABASE_URL")

    cluster = add("cluster", cmd_cluster, "Cluster a watched table's vectors (a worker runs scikit-learn).")
    cluster.add_argument("table")
    cluster.add_argument("--k", type=int, help="number of clusters (default: chosen by silhouette)")
    cluster.add_argument("--method", default="kmeans", choices=["kmeans", "minibatch_kmeans", "hdbscan"])
    cluster.add_argument("--model", help="model whose vectors to use (default: the table's default)")
    cluster.add_argument("--wait", action="store_true", help="wait for the run and print its clusters")
    cluster.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")

    mapping = add("map", cmd_map, "Project a watched table's vectors to 2-D: coordinates in imgembed.projection, "
                  "a PNG with thumbnails and a self-contained HTML page.")
    mapping.add_argument("table")
    mapping.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"],
                         help="pca (default), tsne, or umap (needs umap-learn)")
    mapping.add_argument("--color-by", help="column to colour points by (default: the label column)")
    mapping.add_argument("--out", default="map.png", help="PNG to write (default map.png)")
    mapping.add_argument("--html", help="HTML page to write (default: the PNG's name with .html)")
    mapping.add_argument("--model", help="model whose vectors to map (default: the table's default)")

    bench = add("bench", cmd_bench, "Measure throughput, latency, trigger cost, search speed and memory on the "
                "embedded services; write the figures to bench/RESULTS.md.")
    bench.add_argument("--model", default="ViT-B-32", help="model to measure (default ViT-B-32 with random weights)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu unless IMGEMBED_DEVICE names cuda")
    bench.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark runs")
    bench.add_argument("--figures", default="1,2,3,4,5,6",
                       help="which figures to measure (default all): 1 raw model, 2 end to end, 3 latency, 4 triggers, "
                            "5 search, 6 memory (needs 2 or 3); with --device cuda, GPU memory and use come with 2")
    bench.add_argument("--photos", help="folder of *.JPEG photos for (2) and (3) (default ../shared/testdata/photos)")
    bench.add_argument("--out", default="bench/RESULTS.md", help="where to write the results (default bench/RESULTS.md)")

    search = add("search", cmd_search, "Search a watched table by text, by an image file, or like one of its rows.")
    search.add_argument("query", nargs="?", help="text to search for, e.g. \"a red car\"")
    search.add_argument("--image", metavar="FILE", help="search with this image (embedded here, with the table's model)")
    search.add_argument("--like", metavar="KEY", help="search for rows similar to the row with this key")
    search.add_argument("--table", default="imgembed.image", help="watched table (default imgembed.image)")
    search.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a text's vector (default 30)")
    demo = add("demo", cmd_demo, "Start the local stack, ingest sample images, wait for their embeddings, show status.")
    demo.add_argument("--photos", default=None, help="directory of photos (default: ../shared/testdata/photos if present)")
    demo.add_argument("--generated", type=int, default=300, help="number of generated images to add (default 300)")
    demo.add_argument("--map", default="imgembed-demo-map.png", help="where to write the embedding map PNG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        _setup_logging(settings)
        return int(args.handler(settings, args) or 0)
    except SettingsError as error:
        print(f"imgembed: {error}", file=sys.stderr)
        return 2
    except LookupError as error:
        print(f"imgembed: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        import psycopg

        if not isinstance(error, psycopg.Error):
            raise
        hint = getattr(error.diag, "message_hint", None)
        print(f"imgembed: {error.diag.message_primary or error}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
