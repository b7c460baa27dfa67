"""Reduced models (imgembed.reduce): PCA fitted by a real worker, projected vectors kept in step
with every row the source model embeds, searched like any model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import psycopg
import pytest
from sklearn.decomposition import PCA

from imgembed.analysis.reduction import fit_reduction, project
from imgembed.db import as_array
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, TEST_MODEL, Services, wait_for
from tests.integration.test_analysis import grouped_vectors
from tests.integration.test_search_sql import load_vectors, unit

REDUCED = f"{TEST_MODEL}@pca8"


def test_the_axes_are_pca_and_the_means_direction() -> None:
    vectors, _ = grouped_vectors(4, 50, seed=3)
    reduction = fit_reduction(vectors, 8)
    pca = PCA(n_components=7).fit(vectors)
    assert np.allclose(reduction.axes @ reduction.axes.T, np.eye(8), atol=1e-9)  # orthonormal
    assert np.allclose(np.abs(np.sum(reduction.axes[:7] * pca.components_, axis=1)), 1, atol=1e-6)
    left_out = pca.mean_ - pca.components_.T @ (pca.components_ @ pca.mean_)
    assert np.allclose(reduction.axes[7], left_out / np.linalg.norm(left_out), atol=1e-6)
    assert reduction.explained_variance == pytest.approx(float(np.sum(pca.explained_variance_ratio_)))
    with pytest.raises(ValueError, match="more than 8 embedded rows; the table has 8"):
        fit_reduction(vectors[:8], 8)


def test_keeping_the_means_direction_keeps_the_neighbours() -> None:
    """Vectors that share a large common part, as embeddings do: the projections rank neighbours as
    the full vectors do, where centred PCA projections would not."""
    rng = np.random.default_rng(0)
    spread = 1 / np.arange(1, 129) ** 0.8  # a decaying spectrum
    groups = rng.normal(size=(40, 128)) * spread
    vectors = groups[rng.integers(0, 40, 2000)] + 0.6 * rng.normal(size=(2000, 128)) * spread + 0.3
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def recall(reduced: np.ndarray) -> float:
        full, small = vectors[:100] @ vectors.T, reduced[:100] @ reduced.T
        for scores in (full, small):
            scores[np.arange(100), np.arange(100)] = -9
        return float(np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10
                              for a, b in zip(full, small)]))

    kept = recall(project(fit_reduction(vectors, 32), vectors))
    centred = recall(unit(PCA(n_components=32).fit_transform(vectors)))
    print(f"recall@10 at 32 of 128 dimensions: {kept:.3f} (centred PCA: {centred:.3f})")
    assert kept >= 0.9 and kept >= centred + 0.1


def stored(db: psycopg.Connection, table: str, model: str | None = None) -> dict[int, np.ndarray]:
    storage = db.execute("SELECT imgembed.storage_table(%s, %s)::text", (table, model)).fetchone()[0]
    return {key: as_array(vector) for key, vector in db.execute(f"SELECT id, embedding FROM {storage} ORDER BY id")}


def fit_of(db: psycopg.Connection, model: str) -> np.ndarray:
    """The stored fit: its axes, one row each."""
    rows = db.execute("SELECT a.direction FROM imgembed.reduction_axis a JOIN imgembed.model m "
                      "ON m.id = a.model_id WHERE m.name = %s ORDER BY a.axis", (model,)).fetchall()
    return np.stack([as_array(row[0]) for row in rows]).astype(np.float64)


def projected(axes: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    coordinates = np.asarray(vectors, dtype=np.float64) @ axes.T
    return coordinates / np.linalg.norm(coordinates, axis=-1, keepdims=True)


def ids(db: psycopg.Connection, query: str, *params: object) -> list[int]:
    return [int(row[0]) for row in db.execute(query, params)]


def test_a_reduced_model_follows_its_table(db: psycopg.Connection, services: Services) -> None:
    vectors, truth = grouped_vectors(4, 50, seed=1)
    db.execute("CREATE TABLE parts (id integer PRIMARY KEY, photo bytea, kind text)")
    placeholder = random_shapes(1, seed=1)[0].png_bytes()
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO parts VALUES (%s, %s, %s)",
                           [(i, placeholder, f"group{truth[i]}") for i in range(len(truth))])
    db.execute("SELECT imgembed.watch('parts', 'photo', label_column => 'kind')")
    load_vectors(db, "public.parts", list(range(len(truth))), vectors)
    db.execute("DELETE FROM imgembed.intake")  # vectors were written directly: nothing for workers to embed

    # Asked for: a model of its own, attached to the table, not fitted yet.
    assert db.execute("SELECT imgembed.reduce('parts', dims => 8)").fetchone()[0] == REDUCED
    assert db.execute("SELECT source_model, dims, source_dims, fitted_on, status FROM imgembed.reductions").fetchall() == [
        (TEST_MODEL, 8, 64, "public.parts", "pending")]
    assert db.execute("SELECT imgembed.reduce('parts', dims => 8)").fetchone()[0] == REDUCED  # asked again: the same
    with pytest.raises(psycopg.Error, match=f"reduced model {REDUCED} is not fitted yet"):
        db.execute("SELECT * FROM imgembed.similar('parts', 0, model => %s)", (REDUCED,))
    with pytest.raises(psycopg.Error, match="is not fitted yet"):
        db.execute("SELECT imgembed.use_model('parts', %s)", (REDUCED,))

    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT status FROM imgembed.reductions").fetchone()[0] in ("done", "failed"), 180,
             "the fit to end")
    status, fitted_rows, explained, error = db.execute(
        "SELECT status, fitted_rows, explained_variance, error FROM imgembed.reductions").fetchone()
    assert (status, fitted_rows, error) == ("done", 200, None)
    assert explained == pytest.approx(float(np.sum(PCA(n_components=7).fit(vectors).explained_variance_ratio_)), abs=1e-5)

    # Every vector is projected: the database's projection is the fit's, and the fit is the one
    # fit_reduction makes of the same vectors.
    fit = fit_of(db, REDUCED)
    reduced = stored(db, "parts", REDUCED)
    assert sorted(reduced) == list(range(200))
    assert np.allclose(np.stack([reduced[i] for i in range(200)]), projected(fit, vectors), atol=1e-5)
    assert np.allclose(np.abs(np.sum(fit * fit_reduction(vectors, 8).axes, axis=1)), 1, atol=1e-4)
    storage = db.execute("SELECT imgembed.storage_table('parts', %s)::text", (REDUCED,)).fetchone()[0]
    assert db.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s",
                      (storage.split(".")[1] + "_hnsw",)).fetchone()[0] == 1  # an index of its own

    # Searched like any model: the neighbours in 8 dimensions are of the row's own group.
    for key in (0, 60, 120, 180):
        found = ids(db, "SELECT id FROM imgembed.similar('parts', %s, 10, model => %s)", key, REDUCED)
        assert len(found) == 10 and {int(truth[i]) for i in found} == {int(truth[key])}
    # A vector of the source model's space is projected first.
    query = "[" + ",".join(f"{x:.8f}" for x in vectors[5]) + "]"
    assert ids(db, "SELECT id FROM imgembed.similar_to_vector('parts', %s::vector, 3, model => %s)", query, REDUCED)[0] == 5
    # A text is embedded by the source model and projected.
    source_text = db.execute("SELECT imgembed.text_vector('a red circle', %s, 60)::text", (TEST_MODEL,)).fetchone()[0]
    reduced_text = as_array(db.execute("SELECT imgembed.text_vector('a red circle', %s)", (REDUCED,)).fetchone()[0])
    assert np.allclose(reduced_text, projected(fit, np.array([json.loads(source_text)]))[0], atol=1e-5)
    assert ids(db, "SELECT id FROM imgembed.search_text('parts', 'a red circle', 5, model => %s)", REDUCED) == ids(
        db, "SELECT id FROM imgembed.similar_to_vector('parts', %s::vector, 5, model => %s)", source_text, REDUCED)

    # A query image likewise, and zero-shot labels rank the projections of the source's prompts.
    photo = random_shapes(1, seed=9)[0].png_bytes()
    source_image = db.execute("SELECT imgembed.image_vector(%s, %s, 60)::text", (photo, TEST_MODEL)).fetchone()[0]
    assert ids(db, "SELECT id FROM imgembed.search_image('parts', %s, 5, model => %s)", photo, REDUCED) == ids(
        db, "SELECT id FROM imgembed.similar_to_vector('parts', %s::vector, 5, model => %s)", source_image, REDUCED)
    db.execute("INSERT INTO imgembed.label_prompt (label, prompt) VALUES ('round', 'a circle'), ('round', 'a disc'), "
               "('square', 'a square')")
    labels = db.execute("SELECT label, similarity FROM imgembed.zero_shot('parts', 3, %s, timeout_seconds => 60)",
                        (REDUCED,)).fetchall()
    prompts = {label: unit(np.stack([as_array(v) for (v,) in db.execute(
        "SELECT imgembed.text_vector(prompt, %s) FROM imgembed.label_prompt WHERE label = %s", (TEST_MODEL, label))])
        ).mean(axis=0) for label in ("round", "square")}
    expected = {label: float(projected(fit, unit(vector[None]))[0] @ reduced[3]) for label, vector in prompts.items()}
    assert sorted(label for label, _ in labels) == ["round", "square"]
    assert all(similarity == pytest.approx(expected[label], abs=1e-4) for label, similarity in labels)

    # New rows, changed images and deleted rows: the source model embeds them (a real forward
    # pass) and the reduced model follows in the same transaction.
    shapes = random_shapes(3, seed=5)
    db.execute("INSERT INTO parts VALUES (500, %s, 'new'), (501, %s, 'new')", (shapes[0].png_bytes(), shapes[1].png_bytes()))
    db.execute("UPDATE parts SET photo = %s WHERE id = 7", (shapes[2].png_bytes(),))
    db.execute("DELETE FROM parts WHERE id = 9")
    wait_for(lambda: db.execute("SELECT pending + in_flight = 0 AND embedded = 201 FROM imgembed.status "
                                "WHERE table_name = 'public.parts' AND model = %s", (TEST_MODEL,)).fetchone()[0],
             120, "the new rows embedded")
    source = stored(db, "parts", TEST_MODEL)
    reduced = stored(db, "parts", REDUCED)
    assert sorted(reduced) == sorted(source) and 9 not in reduced
    for key in (500, 501, 7):
        assert np.allclose(reduced[key], projected(fit, source[key][None])[0], atol=1e-5), key
    assert not np.allclose(source[7], vectors[7], atol=1e-3)  # row 7 was embedded again

    # The default, once fitted. The source cannot go while the reduced model needs it.
    db.execute("SELECT imgembed.use_model('parts', %s)", (REDUCED,))
    assert ids(db, "SELECT id FROM imgembed.similar('parts', 60, 10)") == ids(
        db, "SELECT id FROM imgembed.similar('parts', 60, 10, model => %s)", REDUCED)
    with pytest.raises(psycopg.Error, match=f"reduced model {REDUCED} of table public.parts projects"):
        db.execute("SELECT imgembed.drop_model('parts', %s)", (TEST_MODEL,))
    with pytest.raises(psycopg.Error, match=f"model {TEST_MODEL} is the source of reduced model {REDUCED}"):
        db.execute("SELECT imgembed.forget_model(%s)", (TEST_MODEL,))
    db.execute("SELECT imgembed.use_model('parts', %s)", (TEST_MODEL,))

    # Clear refusals.
    with pytest.raises(psycopg.Error, match="dims must be between 2 and 63"):
        db.execute("SELECT imgembed.reduce('parts', dims => 64)")
    with pytest.raises(psycopg.Error, match=f"model {REDUCED} is a reduced model already"):
        db.execute("SELECT imgembed.reduce('parts', %s, 4)", (REDUCED,))
    with pytest.raises(psycopg.Error, match="exists already, and is not a reduction"):
        db.execute("SELECT imgembed.reduce('parts', dims => 4, name => %s)", (REDUCED,))

    # A fit with too little to learn from fails with its reason, and says so where it is used.
    db.execute("CREATE TABLE few (id integer PRIMARY KEY, photo bytea)")
    db.execute("INSERT INTO few SELECT i, 'x' FROM generate_series(1, 5) i")
    db.execute("SELECT imgembed.watch('few', 'photo')")
    load_vectors(db, "public.few", list(range(1, 6)), vectors[:5])
    db.execute("DELETE FROM imgembed.intake")
    waited = subprocess.run([sys.executable, "-m", "imgembed", "models", "reduce", "few", "--dims", "8", "--name", "few8",
                             "--wait", "--timeout", "120"], cwd=REPO, env=services.env(), capture_output=True, text=True)
    assert waited.returncode == 1 and "the fit of few8 failed: a reduction to 8 dimensions" in waited.stderr
    assert db.execute("SELECT status, error FROM imgembed.reductions WHERE model = 'few8'").fetchone() == (
        "failed", "a reduction to 8 dimensions learns from more than 8 embedded rows; the table has 5")
    with pytest.raises(psycopg.Error, match="not fitted yet") as refused:
        db.execute("SELECT * FROM imgembed.similar('few', 1, model => 'few8')")
    assert "it failed: a reduction to 8 dimensions" in str(refused.value.diag.message_hint)

    # Attached to another table, a fitted model projects that table's vectors with its fit.
    db.execute("SELECT imgembed.reduce('few', dims => 8, name => %s)", (REDUCED,))
    assert np.allclose(np.stack(list(stored(db, "few", REDUCED).values())), projected(fit, vectors[:5]), atol=1e-5)

    # A new table watched with a fitted reduced model: its source comes along and embeds the rows,
    # and the reduced model, the table's default, gets each projection as it is written.
    db.execute("CREATE TABLE more (id integer PRIMARY KEY, photo bytea)")
    db.execute("INSERT INTO more VALUES (1, %s), (2, %s)", (shapes[0].png_bytes(), shapes[1].png_bytes()))
    db.execute("SELECT imgembed.watch('more', 'photo', model => %s)", (REDUCED,))
    assert db.execute("SELECT m.name, wm.is_default FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id "
                      "WHERE wm.watch_id = (SELECT id FROM imgembed.watch WHERE tbl = 'more'::regclass) ORDER BY 1"
                      ).fetchall() == [(TEST_MODEL, False), (REDUCED, True)]
    wait_for(lambda: len(stored(db, "more")) == 2, 120, "the new table's rows projected")
    assert np.allclose(np.stack(list(stored(db, "more").values())), np.stack([reduced[500], reduced[501]]), atol=1e-5)
    db.execute("SELECT imgembed.unwatch('more')")

    # Dropped: its vectors go; forgotten: its fit goes too.
    db.execute("SELECT imgembed.drop_model('parts', %s)", (REDUCED,))
    db.execute("SELECT imgembed.drop_model('few', %s)", (REDUCED,))
    db.execute("SELECT imgembed.forget_model(%s)", (REDUCED,))
    assert db.execute("SELECT count(*) FROM imgembed.reduction_axis").fetchone()[0] == 0
    assert db.execute("SELECT model FROM imgembed.reductions").fetchall() == [("few8",)]
