"""Commands that analyse a table's vectors: cluster, and map (2-D projections)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

from imgembed.cli.common import add_command
from imgembed.settings import Settings, require_database_url

RUN_ENDED = ("done", "failed")


def _wait_for_run(connection: psycopg.Connection, run_id: int, timeout: float) -> tuple[str, str | None, int, float]:
    """Wait until the clustering run ends: (status, error, k, quality); status 'pending' or
    'running' when ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while True:
        status, error, k, quality = connection.execute(
            "SELECT status, error, k, quality FROM imgembed.cluster_run WHERE id = %s", (run_id,)).fetchone()  # type: ignore[misc]
        if status in RUN_ENDED or time.monotonic() > deadline:
            return status, error, k, quality
        time.sleep(0.5)


def cluster(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect
    from imgembed.report import format_table

    with connect(require_database_url(settings)) as connection:
        (run_id,) = connection.execute(
            "SELECT imgembed.cluster(%s::regclass, %s, %s, %s)", (args.table, args.k, args.method, args.model)
        ).fetchone()  # type: ignore[misc]
        print(f"clustering run {run_id} queued")
        if not args.wait:
            return 0
        status, error, k, quality = _wait_for_run(connection, run_id, args.timeout)
        if status not in RUN_ENDED:
            print(f"imgembed cluster: run {run_id} still {status} after {args.timeout}s (is a worker running?)",
                  file=sys.stderr)
            return 1
        if status == "failed":
            print(f"imgembed cluster: run {run_id} failed: {error}", file=sys.stderr)
            return 1
        print(f"run {run_id}: {k} clusters, silhouette {quality if quality is None else round(quality, 3)}")
        rows = connection.execute(
            "SELECT cluster, size, medoid_key, label_mix::text FROM imgembed.cluster_summary WHERE run_id = %s "
            "ORDER BY cluster", (run_id,)).fetchall()
        print(format_table(["cluster", "size", "medoid", "labels"], rows))
    return 0


def map_command(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.analysis.maps import map_table
    from imgembed.db import connect

    out_png = Path(args.out)
    out_html = Path(args.html) if args.html else out_png.with_suffix(".html")
    with connect(require_database_url(settings)) as connection:
        png, page, rows = map_table(connection, args.table, settings, method=args.method, color_by=args.color_by,
                                    out_png=out_png, out_html=out_html, model=args.model)
    print(f"{rows} rows projected with {args.method}; coordinates in imgembed.projection\nPNG: {png}\nHTML: {page}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "cluster", cluster, "Cluster a watched table's vectors (a worker runs scikit-learn).")
    command.add_argument("table")
    command.add_argument("--k", type=int, help="number of clusters (default: chosen by silhouette)")
    command.add_argument("--method", default="kmeans", choices=["kmeans", "minibatch_kmeans", "hdbscan"])
    command.add_argument("--model", help="model whose vectors to use (default: the table's default)")
    command.add_argument("--wait", action="store_true", help="wait for the run and print its clusters")
    command.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")

    command = add_command(commands, "map", map_command, "Project a watched table's vectors to 2-D: coordinates in "
                          "imgembed.projection, a PNG with thumbnails and a self-contained HTML page.")
    command.add_argument("table")
    command.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"],
                         help="pca (default), tsne, or umap (needs umap-learn)")
    command.add_argument("--color-by", help="column to colour points by (default: the label column)")
    command.add_argument("--out", default="map.png", help="PNG to write (default map.png)")
    command.add_argument("--html", help="HTML page to write (default: the PNG's name with .html)")
    command.add_argument("--model", help="model whose vectors to map (default: the table's default)")
