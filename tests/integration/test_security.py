"""Hostile neighbours: a role that may create objects where pgvector lives plants decoys named like
every function and operator imgembed's code calls; none ever runs, whoever calls imgembed. And
every function that runs with its owner's rights is pinned and granted only to who needs it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from imgembed.training.synthetic import random_shapes
from tests.conftest import Services, as_role, wait_for
from tests.hostile import called_names, create_decoy_log, decoys_that_ran, foreign_dependencies, plant_decoys


def _called_names(db: psycopg.Connection) -> set[str]:
    """Every bare name called like a function in the bodies of imgembed's functions as installed."""
    return called_names(row[0] for row in db.execute(
        "SELECT prosrc FROM pg_proc WHERE pronamespace = 'imgembed'::regnamespace"))


@pytest.fixture
def mallory(db: psycopg.Connection, database_url: str) -> Iterator[psycopg.Connection]:
    """A role allowed to create objects in the schema holding pgvector (public here), and the log
    every decoy it plants writes to, whichever role runs it."""
    name = f"mallory_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {name} LOGIN")
    db.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {name}")
    with psycopg.connect(as_role(database_url, name), autocommit=True) as connection:
        create_decoy_log(connection)
        yield connection
    db.execute("DROP TABLE IF EXISTS public.decoy_log")
    db.execute(f"DROP OWNED BY {name}")
    db.execute(f"DROP ROLE {name}")


def test_no_decoy_ever_runs(db: psycopg.Connection, mallory: psycopg.Connection, services: Services) -> None:
    names = _called_names(db)
    assert {"format", "array_agg", "unnest", "count"} <= names  # the bodies were read
    planted = plant_decoys(mallory, names | {"l2_normalize", "vector_dims", "avg", "sum"})
    assert not [name for name, count in planted.items() if count == 0], planted  # every name has its decoys

    # Everything imgembed does, by everyone who does it: watch and trigger (owner and writers),
    # dispatch and embed (worker processes), search, label, recommend, status (readers).
    db.execute("CREATE TABLE items (id bigint PRIMARY KEY, photo bytea, label text, ok boolean)")
    db.execute("SELECT imgembed.watch('items', 'photo', label_column => 'label')")
    shapes = random_shapes(24, seed=17)
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO items VALUES (%s, %s, %s, %s)",
                           [(i, shape.png_bytes(), shape.colour if i % 3 else None, i % 2 == 0)
                            for i, shape in enumerate(shapes)])
    db.execute("UPDATE items SET photo = %s WHERE id = 0", (shapes[5].png_bytes(),))
    services.start("dispatch")
    services.start("worker")
    wait_for(lambda: db.execute("SELECT embedded = 24 AND pending + in_flight = 0 FROM imgembed.status "
                                "WHERE table_name = 'public.items'").fetchone()[0], 180, "the items embedded")
    db.execute("INSERT INTO imgembed.label_prompt (label, prompt) VALUES ('red', 'a red shape')")
    wait_for(lambda: db.execute("SELECT embedded = 1 FROM imgembed.status WHERE table_name = 'imgembed.label_prompt' "
                                "AND is_default").fetchone()[0], 120, "the label prompt embedded")
    db.execute("SELECT imgembed.set_known_good('items', good_column => 'ok')")
    for query in (
        "SELECT * FROM imgembed.zero_shot('items', 4::bigint)",
        "SELECT * FROM imgembed.similar('items', 1::bigint, 5)",
        "SELECT * FROM imgembed.similar('items', 1::bigint, 5, filter => '{\"label\": \"red\"}', exact => true)",
        "SELECT * FROM imgembed.similar_to_vector('items', NULL::bigint, imgembed.vector_of('items', 2::bigint), 5)",
        "SELECT * FROM imgembed.search_text('items', NULL::bigint, 'a blue circle', 5, timeout_seconds => 60)",
        f"SELECT * FROM imgembed.search_image('items', NULL::bigint, '\\x{shapes[3].png_bytes().hex()}', 5, "
        "timeout_seconds => 60)",
        "SELECT * FROM imgembed.knn_label('items', 3::bigint)",
        "SELECT * FROM imgembed.classify_prototype('items', 3::bigint)",
        "SELECT * FROM imgembed.recommend('items', ARRAY[1, 2]::bigint[], ARRAY[3]::bigint[], 5)",
        "SELECT * FROM imgembed.near_duplicates('items', max_distance => 0.5)",
        "SELECT imgembed.anomaly_score('items', 3::bigint)",
        "SELECT imgembed.calibrate_anomalies('items')",
        "SELECT * FROM imgembed.status",
        "SELECT * FROM imgembed.predicted_labels",
        "SELECT * FROM imgembed.anomalies",
        "SELECT imgembed.rebuild_index('items')",
        "DELETE FROM items WHERE id = 23",
        "TRUNCATE items",
    ):
        cursor = db.execute(query)
        if cursor.description:
            cursor.fetchall()
    assert decoys_that_ran(mallory) == []
    assert foreign_dependencies(db) == []


def test_functions_with_owner_rights_are_pinned_and_granted_narrowly(db: psycopg.Connection) -> None:
    rows = db.execute(
        "SELECT p.proname, p.proconfig, "
        "       coalesce(array_agg(DISTINCT g.rolname) FILTER (WHERE a.privilege_type = 'EXECUTE' AND g.rolname IS NOT NULL), "
        "                '{}'), "
        "       bool_or(a.grantee = 0 AND a.privilege_type = 'EXECUTE') "
        "  FROM pg_proc p "
        "  LEFT JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a ON true "
        "  LEFT JOIN pg_roles g ON g.oid = a.grantee AND a.grantee <> p.proowner "
        " WHERE p.pronamespace = 'imgembed'::regnamespace AND p.prosecdef GROUP BY p.oid, p.proname, p.proconfig"
    ).fetchall()
    worker_functions = {"expand_intake", "claim_batch", "start_claim", "release_claim", "recover_expired",
                        "in_flight_count", "claimed_images", "finish_batch", "requeue_claim", "claim_cluster_run",
                        "cluster_run_spec", "cluster_input", "finish_cluster_run", "fail_cluster_run", "worker_beat",
                        "model_checksum", "vectors_by_content", "backlog", "claim_reduction", "reduction_spec",
                        "reduction_input", "finish_reduction", "fail_reduction"}
    triggers = {"_on_insert", "_on_update", "_on_delete", "_on_truncate", "_on_truncate_partition",
                "_on_replicated_row", "_on_ddl_end", "_on_sql_drop"}
    text_role = db.execute("SELECT imgembed._text_request_role()").fetchone()[0]
    expected = {**{name: ["imgembed_worker"] for name in worker_functions}, **{name: [] for name in triggers},
                # texts and query images, which no reader may list: each role asks, learns and forgets
                # about its own; dispatchers expire them
                "_request_text": sorted(["imgembed_reader", text_role]), "_text_state": ["imgembed_reader"],
                "_request_text_elsewhere": ["imgembed_reader"], "_request_image": sorted(["imgembed_reader", text_role]),
                "_image_state": ["imgembed_reader"], "_request_image_elsewhere": ["imgembed_reader"],
                "_forget_queries": ["imgembed_reader"], "expire_queries": ["imgembed_worker"]}
    found = {name: sorted(grantees) for name, _, grantees, _ in rows}
    assert found == expected
    for name, config, _, public in rows:
        assert not public, f"{name} may be executed by PUBLIC"
        assert "search_path=pg_catalog, imgembed, pg_temp" in (config or []), (name, config)
