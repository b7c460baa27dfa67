"""Commands for a user's images: ingest files into imgembed.image, and search a watched table."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgembed.cli.common import UsageError, add_command
from imgembed.settings import Settings, require_database_url


def ingest(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.db import connect
    from imgembed.ingest import ingest_paths

    with connect(require_database_url(settings)) as connection:
        count = ingest_paths(connection, args.paths, as_bytes=args.bytes, label=args.label)
    print(f"ingested {count} images into imgembed.image")
    return 0


def search(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed import searching
    from imgembed.db import connect
    from imgembed.report import format_table

    if not (args.image or args.like is not None or args.query):
        raise UsageError("give a text query, --image FILE or --like KEY")
    with connect(require_database_url(settings)) as connection:
        if args.image:
            image = Path(args.image).expanduser()
            if not image.is_file():
                raise UsageError(f"--image {image}: no such file")
            hits = searching.search_image(connection, args.table, image.read_bytes(), args.k, args.timeout)
        elif args.like is not None:
            hits = searching.search_like(connection, args.table, args.like, args.k)
        else:
            hits = searching.search_text(connection, args.table, args.query, args.k, args.timeout)
    print(format_table(["id", "distance"], [(key, round(distance, 4)) for key, distance in hits]))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "ingest", ingest,
                          "Insert image files into imgembed.image (as paths, or as bytes with --bytes).")
    command.add_argument("paths", nargs="+", help="image files or directories")
    command.add_argument("--bytes", action="store_true", help="store the file contents instead of the path")
    command.add_argument("--label", help="label to store with every image")

    command = add_command(commands, "search", search,
                          "Search a watched table by text, by an image file, or like one of its rows.")
    command.add_argument("query", nargs="?", help="text to search for, e.g. \"a red car\"")
    command.add_argument("--image", metavar="FILE", help="search with this image file (the workers embed it with the table's model)")
    command.add_argument("--like", metavar="KEY", help="search for rows similar to the row with this key")
    command.add_argument("--table", default="imgembed.image", help="watched table (default imgembed.image)")
    command.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    command.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the workers to embed a text or an image (default 30)")
