"""Hybrid search: full-text ranking over captions fused with CLIP's text-to-image ranking (RRF),
on generated shapes whose captions are wrong for a known fraction of rows, embedded by a real
worker with the project's trained model."""

from __future__ import annotations

import random
import statistics

import psycopg
import pytest

from imgembed.models.registry import register_model
from imgembed.training.synthetic import COLOURS, SHAPES, draw_shape
from tests.conftest import Services, wait_for

MODEL = "imgembed-shapes"
ROWS = 720  # 40 rows a (colour, shape): enough that some 20 have both a right caption and a right picture
QUERIES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _another(rng: random.Random, colour: str, shape: str) -> tuple[str, str]:
    return rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)])


@pytest.fixture
def captioned(db: psycopg.Connection, services: Services) -> tuple[psycopg.Connection, dict[int, str]]:
    """Products that are a coloured shape each: the caption is another product's for 30% of the
    rows, and the picture shows another product for 25% of them (independently), as in a catalogue
    where both are sometimes wrong. Returns the connection and each row's true "colour shape"."""
    rng = random.Random(7)
    db.execute("CREATE TABLE shapes (id bigint PRIMARY KEY, image bytea, caption text, tags text[])")
    db.execute("SELECT imgembed.watch('shapes', 'image')")
    register_model(db, MODEL)
    db.execute("SELECT imgembed.add_model('shapes', %s)", (MODEL,))
    truth, rows = {}, []
    for key in range(ROWS):
        colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(("small", "large"))
        truth[key] = f"{colour} {shape}"
        caption = f"a {size} {colour} {shape}" if rng.random() >= 0.3 else "a {} {} {}".format(size, *_another(rng, colour, shape))
        pictured = (colour, shape) if rng.random() >= 0.25 else _another(rng, colour, shape)
        picture = draw_shape(pictured[1], pictured[0], size, rng).png_bytes()
        rows.append((key, picture, caption, ["shape", caption.split()[-1]]))
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO shapes VALUES (%s, %s, %s, %s)", rows)
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT bool_and(pending + in_flight = 0 AND embedded = %s) FROM imgembed.status "
                                "WHERE table_name = 'public.shapes'", (ROWS,)).fetchone()[0], 300, "shapes embedded")
    db.execute("SELECT imgembed.text_vector('a warm-up text', %s, 300)", (MODEL,))  # the worker's text tower is ready
    return db, truth


def _precision_at_10(db: psycopg.Connection, truth: dict[int, str], query: str, weights: list[float]) -> float:
    hits = db.execute("SELECT id FROM imgembed.search_hybrid('shapes', NULL::bigint, %s, 10, text_columns => "
                      "ARRAY['caption'], weights => %s, model => %s, timeout_seconds => 60)",
                      (query, weights, MODEL)).fetchall()
    return sum(truth[key] == query for (key,) in hits) / 10


def test_fusion_beats_captions_and_pictures_alone(captioned: tuple[psycopg.Connection, dict[int, str]]) -> None:
    db, truth = captioned
    text_alone, image_alone, fused = [], [], []
    for query in QUERIES:
        text_alone.append(_precision_at_10(db, truth, query, [1, 0]))
        image_alone.append(_precision_at_10(db, truth, query, [0, 1]))
        fused.append(_precision_at_10(db, truth, query, [1, 1]))
    report = "\n".join(f"{query:16} text {t:.1f} image {i:.1f} fused {f:.1f}"
                       for query, t, i, f in zip(QUERIES, text_alone, image_alone, fused))
    print(report)
    assert statistics.mean(fused) >= max(statistics.mean(text_alone), statistics.mean(image_alone)), report
    both_partly_wrong = [index for index in range(len(QUERIES)) if text_alone[index] < 1 and image_alone[index] < 1]
    assert len(both_partly_wrong) >= 3, report
    for index in both_partly_wrong:
        assert fused[index] > max(text_alone[index], image_alone[index]), report

    # The image half alone is search_text's ranking.
    image_only = db.execute("SELECT id FROM imgembed.search_hybrid('shapes', 'red circle', 10, text_columns => "
                            "ARRAY['caption'], weights => ARRAY[0, 1], model => %s)", (MODEL,)).fetchall()
    assert image_only == db.execute("SELECT id FROM imgembed.search_text('shapes', 'red circle', 10, model => %s)",
                                    (MODEL,)).fetchall()


def test_hybrid_search_columns_filters_and_errors(captioned: tuple[psycopg.Connection, dict[int, str]]) -> None:
    db, _ = captioned
    # A tsvector column, and text[] columns, are searched too; filters apply to both halves.
    db.execute("ALTER TABLE shapes ADD COLUMN document tsvector GENERATED ALWAYS AS (to_tsvector('english', caption)) STORED")
    by_column = db.execute("SELECT id, text_rank, image_rank FROM imgembed.search_hybrid('shapes', NULL::bigint, "
                           "'blue square', 20, text_columns => ARRAY['document'], model => %s, timeout_seconds => 120)", (MODEL,)).fetchall()
    by_text = db.execute("SELECT id, text_rank, image_rank FROM imgembed.search_hybrid('shapes', NULL::bigint, "
                         "'blue square', 20, text_columns => ARRAY['caption'], model => %s, timeout_seconds => 120)", (MODEL,)).fetchall()
    assert by_column == by_text and all(isinstance(row[0], int) for row in by_column)
    tagged = db.execute("SELECT id FROM imgembed.search_hybrid('shapes', 'square', 10, text_columns => ARRAY['tags'], "
                        "weights => ARRAY[1, 0], timeout_seconds => 120)").fetchall()
    assert len(tagged) == 10 and all(
        db.execute("SELECT 'square' = ANY (tags) FROM shapes WHERE id = %s", (int(key),)).fetchone()[0] for (key,) in tagged)
    small = db.execute("SELECT s.caption FROM imgembed.search_hybrid('shapes', NULL::bigint, 'red circle', 10, "
                       "text_columns => ARRAY['caption'], model => %s, filter => %s, timeout_seconds => 120) h "
                       "JOIN shapes s ON s.id = h.id",
                       (MODEL, '{"id": [1, 2, 3, 4, 5, 6, 7, 8, 9]}')).fetchall()
    assert 0 < len(small) <= 9
    for call, message in (
        ("text_columns => NULL", "name the text columns"),
        ("text_columns => ARRAY['nope']", 'text column "nope" does not exist'),
        ("text_columns => ARRAY['image']", "has type bytea"),
        ("text_columns => ARRAY['caption'], weights => ARRAY[0, 0]", "weights must be"),
        ("text_columns => ARRAY['caption'], weights => ARRAY[1]", "weights must be"),
        ("text_columns => ARRAY['caption'], k => 0", "k must be at least 1"),
    ):
        with pytest.raises(psycopg.Error, match=message):
            db.execute(f"SELECT * FROM imgembed.search_hybrid('shapes', 'red circle', {call})")
