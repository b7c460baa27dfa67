"""The SQL search surface on known vectors, checked against scikit-learn brute force."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from tests.conftest import storage_of

DIM = 64  # the test model's dimension
ROWS = 2000


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(count: int, seed: int = 0) -> np.ndarray:
    """Half random on the sphere, half in 20 tight clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM))
    clustered = centres[rng.integers(0, 20, count // 2)] + 0.35 * rng.normal(size=(count // 2, DIM))
    return unit(np.vstack([rng.normal(size=(count - count // 2, DIM)), clustered]))


def load_vectors(db: psycopg.Connection, table: str, keys: list[object], vectors: np.ndarray) -> None:
    with db.cursor() as cursor, cursor.copy(
        f"COPY {storage_of(db, table)} (id, embedding, job_id) FROM STDIN"
    ) as copy:
        for key, vector in zip(keys, vectors):
            copy.write_row((key, "[" + ",".join(f"{x:.8f}" for x in vector) + "]", 0))


@pytest.fixture
def library(db: psycopg.Connection) -> tuple[psycopg.Connection, np.ndarray]:
    """`items`: 2,000 rows with known vectors, a category (1% are 'rare') and a label."""
    vectors = make_vectors(ROWS)
    db.execute("CREATE TABLE items (id bigint PRIMARY KEY, photo bytea, category text, label text)")
    with db.cursor() as cursor, cursor.copy("COPY items FROM STDIN") as copy:
        for i in range(ROWS):
            copy.write_row((i, b"x", "rare" if i % 100 == 7 else f"c{i % 5}", None))
    db.execute("SELECT imgembed.watch('items', 'photo', label_column => 'label')")
    load_vectors(db, "public.items", list(range(ROWS)), vectors)
    db.execute("ANALYZE")
    return db, vectors


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    candidates = np.arange(len(vectors)) if allowed is None else allowed
    model = NearestNeighbors(metric="cosine", algorithm="brute").fit(vectors[candidates])
    _, indices = model.kneighbors(query[None, :], n_neighbors=min(k, len(candidates)))
    return [int(candidates[i]) for i in indices[0]]


def test_exact_similar_matches_brute_force(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    for key in (0, 17, 1500, 1999):
        got = db.execute("SELECT id, distance FROM imgembed.similar('items', %s::bigint, 10, exact => true)", (key,)).fetchall()
        others = np.array([i for i in range(ROWS) if i != key])
        expected = brute_force(vectors, vectors[key], 10, others)
        assert [row[0] for row in got] == expected
        distances = 1 - vectors[expected] @ vectors[key]
        np.testing.assert_allclose([row[1] for row in got], distances, atol=1e-5)


def test_hnsw_recall_at_10(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    hits = 0
    queries = range(0, ROWS, 40)
    for key in queries:
        approx = {row[0] for row in db.execute("SELECT id FROM imgembed.similar('items', %s::bigint, 10)", (key,))}
        exact = set(brute_force(vectors, vectors[key], 11)) - {key}
        hits += len(approx & set(list(exact)[:10]))
    assert hits / (10 * len(queries)) >= 0.95


def test_rebuild_index_with_other_settings(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    """rebuild_index() replaces the index with one of the given m and ef_construction; it reads the
    table in physical order whatever the session's synchronize_seqscans, and leaves that alone."""
    db, vectors = library
    index = storage_of(db, "public.items").removeprefix("imgembed.") + "_hnsw"
    db.execute("SET synchronize_seqscans = on")
    db.execute("SELECT imgembed.rebuild_index('items', m => 24, ef_construction => 100)")
    definition = db.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (index,)).fetchone()[0]
    assert "m='24'" in definition and "ef_construction='100'" in definition
    assert db.execute("SHOW synchronize_seqscans").fetchone()[0] == "on"
    build_settings = db.execute("SELECT proconfig FROM pg_proc WHERE oid = 'imgembed._create_index'::regproc").fetchone()[0]
    assert "synchronize_seqscans=off" in build_settings
    found = [row[0] for row in db.execute("SELECT id FROM imgembed.similar('items', 1500::bigint, 10)")]
    assert len(set(found) & set(brute_force(vectors, vectors[1500], 11)[1:])) >= 9


def test_selective_filter_still_returns_k_correct_rows(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    rare = np.array([i for i in range(ROWS) if i % 100 == 7])  # 20 rows, 1%
    for key in (3, 500):
        got = [row[0] for row in db.execute(
            "SELECT id FROM imgembed.similar('items', %s::bigint, 10, filter => %s)", (key, json.dumps({"category": "rare"}))
        )]
        assert got == brute_force(vectors, vectors[key], 10, rare)
    many = [row[0] for row in db.execute(
        "SELECT id FROM imgembed.similar('items', 3::bigint, 10, filter => %s, exact => true)",
        (json.dumps({"category": ["c1", "c2"]}),),
    )]
    allowed = np.array([i for i in range(ROWS) if i % 100 != 7 and i % 5 in (1, 2) and i != 3])
    assert many == brute_force(vectors, vectors[3], 10, allowed)


def test_keyset_pagination_walks_the_same_order(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, _ = library
    everything = db.execute("SELECT id, distance FROM imgembed.similar('items', 1::bigint, 30, exact => true)").fetchall()
    pages: list[tuple[int, float]] = []
    after: tuple[float, int] | None = None
    for _ in range(3):
        if after is None:
            page = db.execute("SELECT id, distance FROM imgembed.similar('items', 1::bigint, 10, exact => true)").fetchall()
        else:
            page = db.execute(
                "SELECT id, distance FROM imgembed.similar('items', 1::bigint, 10, exact => true, "
                "after_distance => %s, after_id => %s)", (after[0], after[1])  # any integer type
            ).fetchall()
        pages.extend(page)
        after = (page[-1][1], page[-1][0])
    assert [row[0] for row in pages] == [row[0] for row in everything]


def test_similar_to_vector_typed_and_text_keys(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    query = "[" + ",".join(map(str, vectors[42])) + "]"
    as_text = db.execute("SELECT id FROM imgembed.similar_to_vector('items', %s::vector, 3, exact => true)", (query,)).fetchall()
    typed = db.execute(
        "SELECT r.id, i.category FROM imgembed.similar_to_vector('items', NULL::bigint, %s::vector, 3, exact => true) r "
        "JOIN items i ON i.id = r.id", (query,)
    ).fetchall()
    assert as_text[0][0] == "42" and typed[0][0] == 42
    assert [int(row[0]) for row in as_text] == [row[0] for row in typed]


def test_keys_keep_their_type_and_ties_order_by_it(db: psycopg.Connection) -> None:
    """Rows 13, 111 and 1000 hold the same vector: they tie on distance and come in key order (13
    before 111, as numbers), typed or as text, through the index or exactly, page after page."""
    db.execute("CREATE TABLE tied (id bigint PRIMARY KEY, photo bytea)")
    db.execute("INSERT INTO tied SELECT g, 'x' FROM unnest(ARRAY[5, 13, 111, 1000]) g")
    db.execute("SELECT imgembed.watch('tied', 'photo')")
    same, other = unit(np.ones((1, DIM)))[0], unit(np.arange(1.0, DIM + 1)[None, :])[0]
    load_vectors(db, "public.tied", [5, 13, 111, 1000], np.vstack([other, same, same, same]))
    query = "[" + ",".join(map(str, same)) + "]"
    for exact in (True, False):
        typed = db.execute("SELECT id FROM imgembed.similar_to_vector('tied', NULL::bigint, %s::vector, 3, exact => %s)",
                           (query, exact)).fetchall()
        assert [row[0] for row in typed] == [13, 111, 1000]
        as_text = db.execute("SELECT id FROM imgembed.similar_to_vector('tied', %s::vector, 3, exact => %s)",
                             (query, exact)).fetchall()
        assert [row[0] for row in as_text] == ["13", "111", "1000"]
    assert [row[0] for row in db.execute("SELECT id FROM imgembed.similar('tied', 13::bigint, 2)")] == [111, 1000]

    first = db.execute("SELECT id, distance FROM imgembed.similar('tied', 5::bigint, 2, exact => true)").fetchall()
    assert [row[0] for row in first] == [13, 111]
    rest = db.execute("SELECT id FROM imgembed.similar('tied', 5::bigint, 2, exact => true, after_distance => %s, "
                      "after_id => %s)", (first[-1][1], first[-1][0])).fetchall()
    assert [row[0] for row in rest] == [1000]
    rest = db.execute("SELECT id FROM imgembed.similar_to_vector('tied', NULL::bigint, %s::vector, 2, exact => true, "
                      "after_distance => 0, after_id => 13)", (query,)).fetchall()
    assert [row[0] for row in rest] == [111, 1000]

    pairs = db.execute("SELECT a, b FROM imgembed.near_duplicates('tied', NULL::bigint, 0.001)").fetchall()
    assert pairs == [(13, 111), (13, 1000), (111, 1000)]
    assert db.execute("SELECT pg_typeof(a)::text FROM imgembed.near_duplicates('tied', NULL::bigint, 0.001) LIMIT 1"
                      ).fetchone()[0] == "bigint"
    with pytest.raises(psycopg.Error, match="max_distance is NULL") as raised:
        db.execute("SELECT * FROM imgembed.near_duplicates('tied', NULL::bigint)")
    assert "NULL::bigint, 0.02" in (raised.value.diag.message_hint or "")

    storage = db.execute("SELECT imgembed.storage_table('tied')").fetchone()[0]
    assert storage.startswith("imgembed.emb_")
    assert db.execute("SELECT count(*) FROM imgembed.storage_table('tied') t JOIN pg_class c ON c.oid = t"
                      ).fetchone()[0] == 1
    assert db.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 4


def test_knn_labels_match_scikit_learn(db: psycopg.Connection) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, DIM))
    labels_of = rng.integers(0, 6, 400)
    vectors = unit(centres[labels_of] + 1.2 * rng.normal(size=(400, DIM)))
    train, queries = np.arange(300), np.arange(300, 400)
    db.execute("CREATE TABLE faces (id text PRIMARY KEY, photo text, person text)")
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO faces VALUES (%s, 'x', %s)",
            [(f"f{i}", f"person{labels_of[i]}" if i in set(train) else None) for i in range(400)],
        )
    db.execute("SELECT imgembed.watch('faces', 'photo', label_column => 'person')")
    load_vectors(db, "public.faces", [f"f{i}" for i in range(400)], vectors)

    classifier = KNeighborsClassifier(n_neighbors=5, weights="distance", metric="cosine", algorithm="brute")
    classifier.fit(vectors[train], [f"person{labels_of[i]}" for i in train])
    expected = classifier.predict(vectors[queries])
    probabilities = classifier.predict_proba(vectors[queries])
    for index, query in enumerate(queries):
        rows = db.execute("SELECT label, votes, confidence FROM imgembed.knn_label('faces', %s::text, 5, exact => true)",
                          (f"f{query}",)).fetchall()
        assert rows[0][0] == expected[index], f"query f{query}"
        assert sum(row[1] for row in rows) == 5
        assert rows[0][2] == pytest.approx(probabilities[index].max(), abs=1e-6)
        vector = "[" + ",".join(map(str, vectors[query])) + "]"
        assert db.execute("SELECT label FROM imgembed.classify('faces', %s::vector, 5, exact => true) LIMIT 1",
                          (vector,)).fetchone()[0] == expected[index]

    predicted = dict(db.execute("SELECT key, label FROM imgembed.predicted_labels WHERE table_name = 'public.faces'").fetchall())
    assert set(predicted) == {f"f{i}" for i in queries}
    agreement = np.mean([predicted[f"f{q}"] == expected[i] for i, q in enumerate(queries)])
    assert agreement >= 0.9  # the view uses the HNSW index, not an exact scan


def query_scores(vectors: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    """Every row's cosine similarity to the normalised weighted sum of the given rows' vectors."""
    query = sum(weight * vectors[key] for key, weight in weights.items())
    return vectors @ (query / np.linalg.norm(query))


def rocchio_ranking(vectors: np.ndarray, weights: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k best rows other than the given ones, best first, with their scores."""
    scores = query_scores(vectors, {key: weight for key, weight in weights.items() if weight})
    ranked = [int(key) for key in np.argsort(-scores, kind="stable") if int(key) not in weights]
    return [(key, float(scores[key])) for key in ranked[:k]]


def test_recommendations(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    single = db.execute("SELECT id, score FROM imgembed.recommend('items', ARRAY[5::bigint], k => 10, exact => true)").fetchall()
    similar = db.execute("SELECT id, distance FROM imgembed.similar('items', 5::bigint, 10, exact => true)").fetchall()
    assert [row[0] for row in single] == [row[0] for row in similar]
    np.testing.assert_allclose([row[1] for row in single], [1 - row[1] for row in similar], atol=1e-5)

    # Likes weigh 1/|likes| each, dislikes -0.5/|dislikes|: the query is their normalised sum, and
    # the score of a row its cosine similarity to it (Rocchio), computed here with numpy.
    positives, negatives = [5, 6, 7], [8, 9]
    got = db.execute("SELECT id, score FROM imgembed.recommend('items', %s::bigint[], %s::bigint[], 50, exact => true)",
                     (positives, negatives)).fetchall()
    expected = rocchio_ranking(vectors, {5: 1 / 3, 6: 1 / 3, 7: 1 / 3, 8: -0.25, 9: -0.25}, 50)
    assert [row[0] for row in got] == [key for key, _ in expected]
    np.testing.assert_allclose([row[1] for row in got], [score for _, score in expected], atol=1e-5)

    # A user's interactions: per item the weights add up; likes are normalised to 1, dislikes to -0.5,
    # and everything the user saw (the view of weight 0 too) is left out.
    db.execute("INSERT INTO imgembed.interaction (user_id, tbl, item, kind, weight) VALUES "
               "('ann', 'items', '5', 'like', 1), ('ann', 'items', '6', 'purchase', 3), "
               "('ann', 'items', '8', 'dislike', -1), ('ann', 'items', '11', 'view', 0)")
    for_user = db.execute("SELECT id, score FROM imgembed.recommend_for_user('items', 'ann', 40)").fetchall()
    expected = rocchio_ranking(vectors, {5: 0.25, 6: 0.75, 8: -0.5, 11: 0.0}, 40)
    expected_scores = dict(expected)
    assert len(for_user) == 40 and not {row[0] for row in for_user} & {"5", "6", "8", "11"}
    np.testing.assert_allclose([row[1] for row in for_user],
                               [float(query_scores(vectors, {5: 0.25, 6: 0.75, 8: -0.5})[int(row[0])])
                                for row in for_user], atol=1e-5)
    assert [row[1] for row in for_user] == sorted((row[1] for row in for_user), reverse=True)
    assert len({int(row[0]) for row in for_user} & set(expected_scores)) >= 36  # through the index: recall >= 0.9
    typed = db.execute("SELECT r.id, i.category FROM imgembed.recommend_for_user('items', NULL::bigint, 'ann', 40) r "
                       "JOIN items i ON i.id = r.id").fetchall()
    assert [row[0] for row in typed] == [int(row[0]) for row in for_user]
    with pytest.raises(psycopg.Error, match="no positive interaction"):
        db.execute("SELECT * FROM imgembed.recommend_for_user('items', 'nobody')")


def test_near_duplicates_each_pair_once(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    db.execute("INSERT INTO items VALUES (5000, 'x', 'c0', NULL), (5001, 'x', 'c0', NULL)")
    nudged = unit(vectors[[10, 10]] + np.array([[0.0] * DIM, [0.001] * DIM]))
    load_vectors(db, "public.items", [5000, 5001], nudged)
    pairs = db.execute("SELECT a, b, distance FROM imgembed.near_duplicates('items', 0.001)").fetchall()
    keys = {(a, b) for a, b, _ in pairs}
    assert {("10", "5000"), ("10", "5001"), ("5000", "5001")} <= keys
    assert len(keys) == len(pairs)
    assert all(distance <= 0.001 for _, _, distance in pairs)


def test_zero_shot_ranks_prompts_by_cosine(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, vectors = library
    prompts = {"cat": [100, 101], "dog": [200], "car": [300]}
    with db.cursor() as cursor:
        for label, sources in prompts.items():
            for n, _ in enumerate(sources):
                cursor.execute("INSERT INTO imgembed.label_prompt (label, prompt) VALUES (%s, %s)", (label, f"{label} {n}"))
    ids = dict(db.execute("SELECT prompt, id FROM imgembed.label_prompt").fetchall())
    prompt_keys = [ids[f"{label} {n}"] for label, sources in prompts.items() for n, _ in enumerate(sources)]
    prompt_vectors = vectors[[s for sources in prompts.values() for s in sources]]
    # Prompts waiting for a worker: zero_shot waits for them, then refuses, naming their labels.
    with pytest.raises(psycopg.Error, match="prompts of labels car, cat, dog are not embedded yet"):
        db.execute("SELECT * FROM imgembed.zero_shot('items', 200::bigint, timeout_seconds => 0.2)")
    load_vectors(db, "imgembed.label_prompt", prompt_keys, prompt_vectors)
    with pytest.raises(psycopg.Error, match="not embedded yet"):  # vectors, but their jobs are still queued
        db.execute("SELECT * FROM imgembed.zero_shot('items', 200::bigint, timeout_seconds => 0)")
    db.execute("SELECT imgembed.expand_intake(1000)")
    db.execute("DELETE FROM imgembed.job WHERE watch_id = (SELECT id FROM imgembed.watch "
               "WHERE tbl = 'imgembed.label_prompt'::regclass)")  # as a worker that wrote them would

    rows = db.execute("SELECT label, similarity, probability FROM imgembed.zero_shot('items', 200::bigint)").fetchall()
    means = {label: unit(vectors[sources].mean(axis=0, keepdims=True))[0] for label, sources in prompts.items()}
    expected = sorted(means, key=lambda label: -float(means[label] @ vectors[200]))
    assert [row[0] for row in rows] == expected
    assert rows[0][0] == "dog" and rows[0][1] == pytest.approx(1.0, abs=1e-5)
    assert sum(row[2] for row in rows) == pytest.approx(1.0)
    assert [row[0] for row in db.execute("SELECT label FROM imgembed.zero_shot('items', 200::bigint, labels => "
                                         "ARRAY['cat', 'car'])")] == [label for label in expected if label != "dog"]

    # A new prompt counts from the start: its label is pending, never silently left out.
    db.execute("INSERT INTO imgembed.label_prompt (label, prompt) VALUES ('bird', 'a bird')")
    with pytest.raises(psycopg.Error, match="prompts of labels bird are not embedded yet"):
        db.execute("SELECT * FROM imgembed.zero_shot('items', 200::bigint, timeout_seconds => 0)")
    db.execute("SELECT imgembed.expand_intake(1000)")
    db.execute("UPDATE imgembed.job SET status = 'failed', last_error = 'unreadable: the text went missing' "
               "WHERE key = (SELECT id::text FROM imgembed.label_prompt WHERE label = 'bird') "
               "AND watch_id = (SELECT id FROM imgembed.watch WHERE tbl = 'imgembed.label_prompt'::regclass)")
    with pytest.raises(psycopg.Error, match="a prompt of label bird: unreadable: the text went missing"):
        db.execute("SELECT * FROM imgembed.zero_shot('items', 200::bigint)")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("SELECT * FROM imgembed.similar('items', 1::bigint, 5, filter => %s)", "does not exist in table"),
        ("SELECT * FROM imgembed.similar('items', 1::bigint, 0)", "k must be at least 1"),
        ("SELECT * FROM imgembed.similar('items', 999999::bigint)", "has no vector yet"),
        ("SELECT * FROM imgembed.similar('imgembed.model', 1::bigint)", "is not watched"),
        ("SELECT * FROM imgembed.similar('items', 1::bigint, model => 'nope')", "not attached"),
        ("SELECT * FROM imgembed.similar_to_vector('items', '[1,2,3]'::vector)", "3 dimensions"),
        ("SELECT * FROM imgembed.knn_label('faces_missing', 'x'::text)", "does not exist"),
    ],
)
def test_bad_calls_and_injection_attempts(library: tuple[psycopg.Connection, np.ndarray], call: str, message: str) -> None:
    db, _ = library
    params = (json.dumps({"category = category OR true; DROP TABLE items; --": "x"}),) if "%s" in call else ()
    with pytest.raises(psycopg.Error, match=message):
        db.execute(call, params)
    assert db.execute("SELECT count(*) FROM items").fetchone()[0] == ROWS


def test_filter_values_are_data_not_sql(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, _ = library
    hostile = json.dumps({"category": "rare' OR '1'='1"})
    assert db.execute("SELECT count(*) FROM imgembed.similar('items', 1::bigint, 10, filter => %s)", (hostile,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM items").fetchone()[0] == ROWS


def test_models_above_2000_dimensions_use_a_halfvec_index(db: psycopg.Connection) -> None:
    db.execute("SELECT imgembed.register_model('wide-test', 'wide', NULL, 2500)")
    db.execute("CREATE TABLE wide (id integer PRIMARY KEY, photo bytea)")
    db.execute("INSERT INTO wide SELECT g, 'x' FROM generate_series(1, 50) g")
    db.execute("SELECT imgembed.watch('wide', 'photo', model => 'wide-test')")
    index = db.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (storage_of(db, "public.wide").removeprefix("imgembed.") + "_hnsw",)).fetchone()[0]
    assert "halfvec(2500)" in index and "halfvec_cosine_ops" in index
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(50, 2500)))
    load_vectors(db, "public.wide", list(range(1, 51)), vectors)
    got = [row[0] for row in db.execute("SELECT id FROM imgembed.similar('wide', 1, 5, exact => true)")]
    assert got == [int(i) + 1 for i in brute_force(vectors, vectors[0], 6)[1:]]


def test_search_leaves_the_sessions_ef_search_alone(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, _ = library
    db.execute("SET hnsw.ef_search = 77")
    db.execute("SET imgembed.ef_search = 12")
    for ef in (None, 5):
        assert len(db.execute("SELECT * FROM imgembed.similar('items', 3::bigint, 10, ef_search => %s)", (ef,)).fetchall()) == 10
        assert db.execute("SHOW hnsw.ef_search").fetchone()[0] == "77"


def test_similarity_join_matches_brute_force(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    """For each row of another table (text keys), its k nearest rows of `items`, with LATERAL-free
    SQL, typed keys, a filter, and the table joined with itself (a row is not its own neighbour)."""
    db, vectors = library
    photos = make_vectors(30, seed=5)
    db.execute("CREATE TABLE uploads (name text PRIMARY KEY, photo bytea)")
    names = [f"upload {i}" for i in range(30)]
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO uploads VALUES (%s, 'x')", [(name,) for name in names])
    db.execute("SELECT imgembed.watch('uploads', 'photo')")
    load_vectors(db, "public.uploads", names, photos)

    rows = db.execute("SELECT a_id, b_id, distance FROM imgembed.similarity_join('uploads', 'items', 4, exact => true)"
                      ).fetchall()
    found: dict[str, list[str]] = {}
    for a_id, b_id, _ in rows:
        found.setdefault(a_id, []).append(b_id)
    assert found == {name: [str(i) for i in brute_force(vectors, photos[n], 4)] for n, name in enumerate(names)}

    typed = db.execute("SELECT a_id, b_id FROM imgembed.similarity_join('uploads', 'items', NULL::text, NULL::bigint, 4, "
                       "exact => true)").fetchall()
    assert typed == [(a_id, int(b_id)) for a_id, b_id, _ in rows]
    rare = np.array([i for i in range(ROWS) if i % 100 == 7])
    filtered = db.execute("SELECT a_id, b_id FROM imgembed.similarity_join('uploads', 'items', NULL::text, NULL::bigint, "
                          "2, filter => '{\"category\": \"rare\"}')").fetchall()
    assert [b for a, b in filtered if a == "upload 3"] == brute_force(vectors, photos[3], 2, rare)

    itself = db.execute("SELECT a_id, b_id FROM imgembed.similarity_join('uploads', 'uploads', 1)").fetchall()
    assert dict(itself) == {name: names[brute_force(photos, photos[n], 2)[1]] for n, name in enumerate(names)}
    with pytest.raises(psycopg.Error, match="k must be at least 1"):
        db.execute("SELECT * FROM imgembed.similarity_join('uploads', 'items', 0)")


def test_max_distance_cuts_every_search_alike(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    """max_distance keeps, of the k nearest, those at most that far: through the index, the exact
    scan and a filter alike, and in similar, similar_to_vector and similarity_join."""
    db, vectors = library
    query = 11
    distances = 1 - vectors @ vectors[query]
    nearest = [i for i in brute_force(vectors, vectors[query], 21) if i != query][:20]
    cut = float(np.median(distances[nearest]))  # half of the 20 nearest are within it
    within = [i for i in nearest if distances[i] <= cut]
    assert 0 < len(within) < 20
    for exact in (False, True):
        found = db.execute("SELECT id, distance FROM imgembed.similar('items', %s::bigint, 20, exact => %s, "
                           "max_distance => %s)", (query, exact, cut)).fetchall()
        assert [row[0] for row in found] == within and all(row[1] <= cut for row in found)
    vector = "[" + ",".join(f"{x:.8f}" for x in vectors[query]) + "]"
    by_vector = db.execute("SELECT id FROM imgembed.similar_to_vector('items', NULL::bigint, %s::vector, 21, exact => true, "
                           "max_distance => %s)", (vector, cut)).fetchall()
    assert [row[0] for row in by_vector] == [query, *within]
    rare = [i for i in range(ROWS) if i % 100 == 7]
    rare_cut = float(np.sort(distances[rare])[3])
    filtered = db.execute("SELECT id FROM imgembed.similar('items', %s::bigint, 10, filter => '{\"category\": \"rare\"}', "
                          "max_distance => %s)", (query, rare_cut)).fetchall()
    assert [row[0] for row in filtered] == [i for i in brute_force(vectors, vectors[query], 10, np.array(rare))
                                            if distances[i] <= rare_cut]
    assert db.execute("SELECT count(*) FROM imgembed.similar('items', %s::bigint, 10, max_distance => -1)",
                      (query,)).fetchone()[0] == 0
    joined = db.execute("SELECT b_id FROM imgembed.similarity_join('items', 'items', 20, exact => true, "
                        "max_distance => %s) WHERE a_id = %s", (cut, str(query))).fetchall()
    assert [int(row[0]) for row in joined] == within


def test_max_distance_on_recommendations(library: tuple[psycopg.Connection, np.ndarray]) -> None:
    db, _ = library
    call = ("SELECT id, score FROM imgembed.recommend('items', ARRAY[3, 4]::bigint[], ARRAY[5]::bigint[], 20, "
            "exact => true, max_distance => %s)")
    full = db.execute(call, (None,)).fetchall()
    cut = 1 - (full[9][1] + full[10][1]) / 2  # between the 10th and 11th best
    assert db.execute(call, (cut,)).fetchall() == full[:10]
    db.execute("INSERT INTO imgembed.interaction (user_id, tbl, item) VALUES ('ann', 'items', '3')")
    liked = db.execute("SELECT id, score FROM imgembed.recommend_for_user('items', NULL::bigint, 'ann', 5)").fetchall()
    cut = 1 - (liked[1][1] + liked[2][1]) / 2
    assert db.execute("SELECT id, score FROM imgembed.recommend_for_user('items', NULL::bigint, 'ann', 5, "
                      "max_distance => %s)", (cut,)).fetchall() == liked[:2]
