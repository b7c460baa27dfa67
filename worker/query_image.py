"""Searching a watched table with an image file that is in no table: the image is embedded in
this process, with the table's default model, and searched for with ``similar_to_vector``."""

from __future__ import annotations

from pathlib import Path

import psycopg

from imgembed.models.names import parse_model_spec
from imgembed.search import Hit
from imgembed.settings import Settings
from imgembed.worker.decode import decode_image
from imgembed.worker.embedding import load_model
from imgembed.worker.sources import ImageSource, read_source


def search_image(
    connection: psycopg.Connection, table: str, image_path: Path, settings: Settings, k: int = 10
) -> list[Hit]:
    """Embed a local image file here, with the table's default model, and search with it."""
    row = connection.execute(
        "SELECT m.name FROM imgembed._live_watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id AND wm.is_default "
        "JOIN imgembed.model m ON m.id = wm.model_id WHERE w.tbl = %s::regclass",
        (table,),
    ).fetchone()
    if row is None:
        raise LookupError(f"table {table} is not watched by imgembed or has no model")
    model = load_model(parse_model_spec(row[0]), settings.device, tower="image", model_dir=settings.models_path)
    data = read_source(ImageSource(uri=str(image_path.expanduser().resolve())), settings)
    pixels = model.preprocess(decode_image(data, settings, target_size=model.input_size)).unsqueeze(0)
    vector = model.embed_pixels(pixels)[0]
    return [
        (row[0], row[1])
        for row in connection.execute(
            "SELECT id, distance FROM imgembed.similar_to_vector(%s::regclass, %s, %s)", (table, vector, k)
        )
    ]
