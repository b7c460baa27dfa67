"""``imgembed demo``: a fresh local stack, sample images in, embeddings out, status shown."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from worker.db import connect
from worker.embedding import ModelLoadError, load_model
from worker.ingest import ingest_paths
from worker.model_spec import parse_model_spec
from worker.models import register_model
from worker.report import status_report
from worker.settings import DEFAULT_MODEL, Settings
from worker.stack import local_stack
from worker.synthetic import random_shapes

FALLBACK_MODEL = "imgembed-tiny"
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "photos"
WAIT_LIMIT_SECONDS = 600


def choose_model(settings: Settings) -> tuple[str, str]:
    """The model to demo and why: the configured one if it loads, else the bundled fallback."""
    try:
        load_model(parse_model_spec(settings.model), "cpu")
    except ModelLoadError as error:
        return FALLBACK_MODEL, f"fallback: {settings.model} could not be loaded ({error})"
    origin = "the default pretrained model" if settings.model == DEFAULT_MODEL else "IMGEMBED_MODEL"
    return settings.model, f"{origin} loaded"


def photo_labels(photos_dir: Path) -> dict[Path, str]:
    labels_file = photos_dir / "LABELS.csv"
    if not labels_file.exists():
        return {}
    with labels_file.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    file_column = next((i for i, name in enumerate(header) if name.lower() in ("file", "filename", "path")), 0)
    label_column = next((i for i, name in enumerate(header) if name.lower() in ("label", "class", "name")), 1)
    return {(photos_dir / row[file_column]).resolve(): row[label_column] for row in body if len(row) > label_column}


def wait_for_embeddings(connection: object, model: str, total: int) -> None:
    query = (
        "SELECT embedded, failed, pending + in_flight FROM imgembed.status "
        "WHERE table_name = 'imgembed.image' AND model = %s"
    )
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    with tqdm(total=total, desc="embedding", unit="img") as progress:
        while time.monotonic() < deadline:
            embedded, failed, waiting = connection.execute(query, (model,)).fetchone()  # type: ignore[attr-defined]
            progress.n = embedded + failed
            progress.refresh()
            if waiting == 0 and embedded + failed >= total:
                return
            time.sleep(0.5)
    raise TimeoutError(f"embeddings not finished after {WAIT_LIMIT_SECONDS}s; see `imgembed status`")


def run_demo(settings: Settings, photos_dir: str | None = None, generated: int = 100) -> int:
    model, reason = choose_model(settings)
    print(f"model: {model} ({reason})")
    demo_dir = settings.data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_settings = settings.with_overrides(model=model, data_dir=demo_dir)
    with local_stack(demo_settings) as stack:
        print(f"services up: DATABASE_URL={stack.settings.database_url}")
        with connect(stack.settings.database_url or "") as connection:
            register_model(connection, model, make_default=True)
            total = 0
            photos = Path(photos_dir) if photos_dir else SHARED_PHOTOS
            if photos.is_dir():
                total += ingest_paths(connection, [photos], labels=photo_labels(photos))
                print(f"ingested {total} photos from {photos}")
            shapes = random_shapes(generated, seed=7)
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO imgembed.image (content, label) VALUES (%s, %s)",
                    [(shape.png_bytes(), shape.caption) for shape in shapes],
                )
            total += len(shapes)
            print(f"inserted {len(shapes)} generated images; {total} in all")
            wait_for_embeddings(connection, model, total)
            print()
            print(status_report(connection))
    return 0

