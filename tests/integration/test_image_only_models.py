"""timm's image-only models (``timm:ARCH``) work wherever an image model works, through a real
worker, and text functions refuse them with an error that names a text-capable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest

from imgembed.models.registry import register_model
from imgembed.training.synthetic import random_shapes
from tests.conftest import Services, knn_label_votes, knn_votes, wait_for

MODEL = "timm:test_resnet"  # timm's tiny test ResNet, seeded random weights: 96 dimensions, 160 px


def _embedded(db: psycopg.Connection, model: str, rows: int) -> bool:
    return bool(db.execute("SELECT pending + in_flight = 0 AND embedded = %s FROM imgembed.status "
                           "WHERE table_name = 'public.items' AND model = %s", (rows, model)).fetchone()[0])


def test_a_timm_model_embeds_searches_labels_and_refuses_texts(db: psycopg.Connection, services: Services,
                                                              tmp_path: Path) -> None:
    shapes = random_shapes(30, seed=23)
    db.execute("CREATE TABLE items (id bigint PRIMARY KEY, image bytea, colour text)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO items VALUES (%s, %s, %s)",
                           [(i, shape.png_bytes(), shape.colour if i % 4 else None) for i, shape in enumerate(shapes)])
    db.execute("INSERT INTO items SELECT 30, image, colour FROM items WHERE id = 3")  # a duplicate
    register_model(db, MODEL)
    db.execute("SELECT imgembed.watch('items', 'image', label_column => 'colour', model => %s)", (MODEL,))
    assert db.execute("SELECT dim, text_tower FROM imgembed.model WHERE name = %s", (MODEL,)).fetchone() == (96, False)
    # Texts and label prompts are not embedded with it; query images are.
    attached = {row[0] for row in db.execute(
        "SELECT w.table_name FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
        "JOIN imgembed.model m ON m.id = wm.model_id WHERE m.name = %s", (MODEL,))}
    assert attached == {"public.items", "imgembed.image_query"}
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: _embedded(db, MODEL, 31), 180, "items embedded with the timm model")

    vectors = np.array([row[0].to_numpy() for row in db.execute(
        "SELECT embedding FROM " + db.execute("SELECT imgembed.storage_table('items')").fetchone()[0] + " ORDER BY id")])
    assert vectors.shape == (31, 96)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert len({vector.tobytes() for vector in vectors}) == 30  # the duplicate has its twin's vector

    similar = db.execute("SELECT id, distance FROM imgembed.similar('items', 3::bigint, 3)").fetchall()
    assert similar[0] == (30, pytest.approx(0, abs=1e-6))
    assert knn_label_votes(db, "items", "0::bigint") == knn_votes(db, "items", 0, "id", "colour")
    pairs = db.execute("SELECT a, b FROM imgembed.near_duplicates('items', NULL::bigint, 0.000001)").fetchall()
    assert (3, 30) in pairs
    assert len(db.execute("SELECT * FROM imgembed.recommend('items', ARRAY[1, 2]::bigint[], ARRAY[]::bigint[], 5)"
                          ).fetchall()) == 5
    by_image = db.execute("SELECT id FROM imgembed.search_image('items', NULL::bigint, %s, 1, timeout_seconds => 60)",
                          (shapes[7].png_bytes(),)).fetchone()
    assert by_image == (7,)

    for call in ("imgembed.search_text('items', 'a red circle')", "imgembed.zero_shot('items', 1::bigint)",
                 "imgembed.search_hybrid('items', 'red', text_columns => ARRAY['colour'])"):
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="embeds images only") as raised:
            db.execute(f"SELECT * FROM {call}")
        assert "ViT-B-32" in (raised.value.diag.message_hint or "")


def test_a_timm_checkpoint_and_an_unloadable_tag(db: psycopg.Connection, services: Services, tmp_path: Path) -> None:
    """A local checkpoint gives the same vectors as the weights it holds; a pretrained tag that
    cannot be downloaded is an outage its rows wait out (HF_HUB_OFFLINE here)."""
    import timm
    import torch

    from imgembed.models.names import RANDOM_INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    checkpoint = tmp_path / "test_vit.pth"
    torch.save(model.state_dict(), checkpoint)
    from_file, seeded, offline = f"timm:test_vit:{checkpoint}", "timm:test_vit", "timm:test_vit.r160_in1k"
    db.execute("CREATE TABLE items (id bigint PRIMARY KEY, image bytea)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO items VALUES (%s, %s)",
                           [(i, shape.png_bytes()) for i, shape in enumerate(random_shapes(6, seed=5))])
    for name in (from_file, seeded, offline):
        register_model(db, name)
    db.execute("SELECT imgembed.watch('items', 'image', model => %s)", (from_file,))
    db.execute("SELECT imgembed.add_model('items', %s)", (seeded,))
    db.execute("SELECT imgembed.add_model('items', %s)", (offline,))
    services.extra_env["HF_HUB_OFFLINE"] = "1"
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: _embedded(db, from_file, 6) and _embedded(db, seeded, 6), 180, "both embedded")
    by_model = {}
    for name in (from_file, seeded):
        storage = db.execute("SELECT imgembed.storage_table('items', %s)", (name,)).fetchone()[0]
        by_model[name] = np.array([row[0].to_numpy() for row in db.execute(f"SELECT embedding FROM {storage} ORDER BY id")])
    np.testing.assert_allclose(by_model[from_file], by_model[seeded], atol=1e-5)
    wait_for(lambda: db.execute("SELECT count(*) FROM imgembed.unavailable_models WHERE model = %s",
                                (offline,)).fetchone()[0] == 1, 60, "the outage said")
    assert db.execute("SELECT failed FROM imgembed.status WHERE model = %s AND table_name = 'public.items'",
                      (offline,)).fetchone()[0] == 0  # its rows wait, none fails
