"""`imgembed demo`: a fresh local stack, generated images in, embeddings out, questions answered."""

from __future__ import annotations

import argparse

from imgembed.cli.common import add_command, interrupt_on_sigterm
from imgembed.settings import Settings


def demo(settings: Settings, args: argparse.Namespace) -> int:
    from imgembed.examples.demo import run_demo

    interrupt_on_sigterm()
    return run_demo(settings, photos_dir=args.photos, generated=args.generated, map_out=args.map)


def add_commands(commands: argparse._SubParsersAction) -> None:
    command = add_command(commands, "demo", demo, "Start a local stack, insert generated images (and your photos), "
                          "wait for their embeddings, answer questions in SQL, draw a map.")
    command.add_argument("--photos", default=None, help="a folder of your own photos to add (LABELS.csv beside "
                         "them gives labels)")
    command.add_argument("--generated", type=int, default=300, help="number of generated images to add (default 300)")
    command.add_argument("--map", default="imgembed-demo-map.png", help="where to write the embedding map PNG")
