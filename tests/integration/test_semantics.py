"""The project's own model (imgembed-shapes, trained here on generated shapes) must really work
through the whole pipeline: rows inserted -> workers -> SQL answers."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from imgembed.models.registry import register_model
from imgembed.training.synthetic import COLOURS, SHAPES, random_shapes
from tests.conftest import Services, wait_for

MODEL = "imgembed-shapes"


@pytest.fixture
def shapes_library(db: psycopg.Connection, services: Services) -> tuple[psycopg.Connection, list]:
    """300 freshly generated images (a seed the model never saw); 100 of them left unlabelled."""
    register_model(db, MODEL)
    shapes = random_shapes(300, seed=2026)
    db.execute("CREATE TABLE scenes (id integer PRIMARY KEY, image bytea, shape text, colour text)")
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO scenes VALUES (%s, %s, %s, %s)",
            [(i, s.png_bytes(), s.shape if i >= 100 else None, s.colour) for i, s in enumerate(shapes)],
        )
    db.execute("SELECT imgembed.watch('scenes', 'image', label_column => 'shape', model => %s)", (MODEL,))
    services.extra_env["IMGEMBED_MODEL"] = MODEL
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT embedded = 300 AND pending + in_flight = 0 FROM imgembed.status "
                                "WHERE table_name = 'public.scenes'").fetchone()[0], 240, "300 scenes embedded")
    return db, shapes


@pytest.mark.slow
def test_text_search_knn_and_zero_shot_have_meaning(shapes_library: tuple[psycopg.Connection, list]) -> None:
    db, shapes = shapes_library

    precisions = {}
    for colour in COLOURS:
        for shape in SHAPES:
            hits = db.execute("SELECT id::int FROM imgembed.search_text('scenes', %s, 10, timeout_seconds => 60)",
                              (f"a {colour} {shape}",)).fetchall()
            relevant = sum(s.colour == colour and s.shape == shape for s in shapes)
            found = sum(shapes[i].colour == colour and shapes[i].shape == shape for (i,) in hits)
            # Precision@10, out of what can be found: a pair with only 5 images can score 5/5.
            precisions[(colour, shape)] = found / min(10, relevant)
    print("precision@10 per colour x shape:", precisions)
    assert np.mean(list(precisions.values())) >= 0.9
    assert precisions[("red", "circle")] >= 0.9

    agree = [db.execute("SELECT label FROM imgembed.knn_label('scenes', %s, 5) LIMIT 1", (i,)).fetchone()[0] == shapes[i].shape
             for i in range(100)]
    print("kNN shape agreement:", np.mean(agree))
    assert np.mean(agree) >= 0.95

    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO imgembed.label_prompt (label, prompt) VALUES (%s, %s)",
                           [(colour, template.format(colour)) for colour in COLOURS
                            for template in ("a {} shape", "something {}")])
    # Asked at once, zero_shot waits for the worker to embed every prompt: no label is left out.
    first = db.execute("SELECT count(*) FROM imgembed.zero_shot('scenes', 0, timeout_seconds => 120)").fetchone()[0]
    assert first == len(COLOURS)
    right = [db.execute("SELECT label FROM imgembed.zero_shot('scenes', %s) LIMIT 1", (i,)).fetchone()[0] == shapes[i].colour
             for i in range(300)]
    print("zero-shot colour accuracy:", np.mean(right))
    assert np.mean(right) >= 0.9
