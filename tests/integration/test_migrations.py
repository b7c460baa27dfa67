"""Alembic migrations: upgrade, downgrade to base, upgrade again, with user data present; released
revisions frozen, and a database made by a released revision upgraded to what a fresh install is."""

from __future__ import annotations

import gzip
import hashlib
import re
import uuid
from collections.abc import Callable

import numpy as np
import psycopg

from imgembed import migrate
from imgembed.db import connect
from imgembed.models.registry import register_model
from tests.conftest import HEAD_REVISION, REPO, as_role, comparable_dump
from tests.hostile import (
    called_names,
    create_decoy_log,
    decoys_that_ran,
    foreign_dependencies,
    plant_decoys,
    shipped_sql,
)


def watched_shop_with_vectors(connection: psycopg.Connection, rows: int, seed: int) -> tuple[str, np.ndarray]:
    """A table ``shop`` of ``rows`` rows watched with a 512-dim model registered as 'old-512', and a
    stored unit vector for each row, as workers would have written them. Returns the vector table's
    name and the vectors."""
    vectors = np.random.default_rng(seed).normal(size=(rows, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    connection.execute("SELECT imgembed.register_model('old-512', 'old', NULL, 512)")
    connection.execute("CREATE TABLE shop (id bigint PRIMARY KEY, photo bytea, kind text)")
    connection.execute("INSERT INTO shop SELECT g, 'x', 'k' || (g %% 3) FROM generate_series(0, %s) g", (rows - 1,))
    connection.execute("SELECT imgembed.watch('shop', 'photo', label_column => 'kind', model => 'old-512')")
    storage = connection.execute(  # the vector table's bare name, at every revision
        "SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
        "WHERE w.tbl = 'shop'::regclass AND wm.is_default"
    ).fetchone()[0]
    with connection.cursor() as cursor, cursor.copy(
        f"COPY imgembed.{storage} (id, embedding, job_id) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["bigint", "vector", "bigint"])
        for key, vector in enumerate(vectors):
            copy.write_row((key, vector, 0))
    return storage, vectors


def imgembed_objects(url: str) -> int:
    with connect(url) as connection:
        return connection.execute(
            "SELECT coalesce((SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid)"
            " + (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid)"
            " FROM pg_namespace n WHERE nspname = 'imgembed'), 0)"
        ).fetchone()[0]


def test_upgrade_downgrade_upgrade_keeps_user_tables(fresh_database: Callable[[str | None], str]) -> None:
    import psycopg

    url = fresh_database(None)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION vector")
        connection.execute("CREATE TABLE shop (id bigint PRIMARY KEY, photo bytea, note text)")
        connection.execute("INSERT INTO shop SELECT g, 'img', 'n' || g FROM generate_series(1, 25) g")
        connection.execute("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
        connection.execute("INSERT INTO public.alembic_version VALUES ('app_rev_1')")

    migrate.upgrade(url)
    assert migrate.current_revision(url) == HEAD_REVISION
    migrate.upgrade(url)  # a second run is a no-op
    with connect(url) as connection:
        register_model(connection, "imgembed-tiny")
        connection.execute("SELECT imgembed.watch('shop', 'photo')")
        connection.execute("SELECT imgembed.expand_intake()")
        assert connection.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 25

    migrate.downgrade(url, "base")
    assert migrate.current_revision(url) is None
    assert imgembed_objects(url) == 0
    with connect(url) as connection:
        assert connection.execute("SELECT count(*), min(note) FROM shop").fetchone() == (25, "n1")
        assert connection.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop'::regclass").fetchone()[0] == 0
        assert connection.execute("SELECT version_num FROM public.alembic_version").fetchone()[0] == "app_rev_1"
        connection.execute("INSERT INTO shop VALUES (26, 'x', 'still writable')")

    migrate.upgrade(url)
    assert migrate.current_revision(url) == HEAD_REVISION
    with connect(url) as connection:
        register_model(connection, "imgembed-tiny")
        connection.execute("SELECT imgembed.watch('shop', 'photo')")
        connection.execute("SELECT imgembed.expand_intake()")
        assert connection.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 26
        assert connection.execute("SELECT count(*) FROM shop").fetchone()[0] == 26


def test_functions_pin_search_path(database_url: str) -> None:
    with connect(database_url) as connection:
        unpinned = connection.execute(
            "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'imgembed'::regnamespace "
            "AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')"
        ).fetchall()
    assert unpinned == []


def test_offline_sql_is_printed(database_url: str, capsys: object) -> None:
    migrate.upgrade(database_url.replace("/t_", "/offline_"), sql_only=True)
    output = capsys.readouterr().out  # type: ignore[attr-defined]
    statements = [line for line in output.splitlines() if line.strip() and not line.startswith("--")]
    assert statements[:2] == ["BEGIN;", "SET LOCAL search_path = pg_catalog, imgembed, pg_temp;"]
    assert "CREATE TABLE imgembed.job" in output
    assert "CREATE OR REPLACE FUNCTION imgembed.finish_batch" in output


def test_revision_0002_converts_existing_vector_tables(fresh_database: Callable[[str | None], str]) -> None:
    """A database at 0001 with TOASTed vectors and a full-precision index: after 0002 the same
    vectors sit in the rows under a half-precision index, and search answers the same."""
    url = fresh_database(None)
    migrate.upgrade(url)
    migrate.downgrade(url, "0001")  # revision 0001's functions, index and storage
    with connect(url) as connection:
        storage, vectors = watched_shop_with_vectors(connection, 300, seed=3)

        def toasted() -> int:
            toast = connection.execute(
                "SELECT reltoastrelid::regclass FROM pg_class WHERE oid = %s::regclass", (f"imgembed.{storage}",)
            ).fetchone()[0]
            return connection.execute(f"SELECT count(*) FROM {toast}").fetchone()[0]

        def index_definition() -> str:
            return connection.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (storage + "_hnsw",)).fetchone()[0]

        def nearest() -> list[tuple[int, float]]:
            return connection.execute("SELECT id, distance FROM imgembed.similar('shop', 7::bigint, 5)").fetchall()

        assert toasted() > 0 and "vector_cosine_ops" in index_definition()
        before = nearest()

        migrate.upgrade(url)
        assert migrate.current_revision(url) == HEAD_REVISION
        assert toasted() == 0
        assert "halfvec(512)" in index_definition() and "halfvec_cosine_ops" in index_definition()
        after = nearest()
        assert [key for key, _ in after] == [key for key, _ in before]
        np.testing.assert_allclose([d for _, d in after], [d for _, d in before], atol=1e-6)
        connection.execute("SET enable_seqscan = off")  # 300 rows: the planner would rather scan them
        plan = "\n".join(row[0] for row in connection.execute(
            f"EXPLAIN SELECT id FROM imgembed.{storage} ORDER BY embedding::halfvec(512) <=> %s::vector::halfvec(512) LIMIT 5",
            (vectors[0],)))
        assert storage + "_hnsw" in plan


def test_revision_0003_orders_index_builds(fresh_database: Callable[[str | None], str]) -> None:
    """0003 makes index builds read the table from its first page; its downgrade undoes only that."""
    url = fresh_database(None)

    def build_settings() -> list[str]:
        with connect(url) as connection:
            return connection.execute(
                "SELECT proconfig FROM pg_proc WHERE oid = 'imgembed._create_index'::regproc").fetchone()[0]

    migrate.upgrade(url)
    assert "synchronize_seqscans=off" in build_settings()
    migrate.downgrade(url, "0002")
    assert not any(setting.startswith("synchronize_seqscans") for setting in build_settings())
    assert any(setting.startswith("search_path") for setting in build_settings())
    migrate.upgrade(url)
    assert "synchronize_seqscans=off" in build_settings()


def test_revision_0004_reports_unavailable_models(fresh_database: Callable[[str | None], str]) -> None:
    """0004 adds what a worker cannot load to its heartbeat; its downgrade restores 0003's."""
    url = fresh_database(None)

    def beat_arguments() -> list[str]:
        with connect(url) as connection:
            return [row[0] for row in connection.execute(
                "SELECT pg_get_function_identity_arguments(oid) FROM pg_proc WHERE proname = 'worker_beat'")]

    migrate.upgrade(url)
    assert beat_arguments() == ["p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint, "
                                "p_unavailable jsonb"]
    with connect(url) as connection:
        connection.execute("SELECT imgembed.worker_beat('w', 1, 'cpu', ARRAY['m'], 3, "
                           "'[{\"model\": \"m\", \"reason\": \"no file\", \"since\": \"2026-11-28T00:00:00+00:00\"}]')")
        assert connection.execute("SELECT model, reason, workers FROM imgembed.unavailable_models").fetchall() == [
            ("m", "no file", ["w"])]
    migrate.downgrade(url, "0003")
    assert beat_arguments() == ["p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint"]
    with connect(url) as connection:
        assert connection.execute("SELECT to_regclass('imgembed.unavailable_models')").fetchone()[0] is None
        assert connection.execute("SELECT worker, batches FROM imgembed.workers").fetchall() == [("w", 3)]
        assert connection.execute("SELECT proconfig IS NOT NULL AND prosecdef FROM pg_proc WHERE proname = 'worker_beat'"
                                  ).fetchone()[0]
    migrate.upgrade(url)
    assert len(beat_arguments()) == 1


# Released revisions never change (sha256 of each revision's files as released). A new revision is
# added here when it is released; a changed checksum means a released revision was edited. Once, in
# 0.2.0, 0001, 0002 and the downgrades of 0002, 0004 and 0005 were amended for security: they name
# pgvector's objects in its schema (@vector@) and pin functions without it, since migrations no
# longer resolve names through the migrating role's search_path. The objects they make are the same.
RELEASED_REVISION_FILES = {
    "0001_pipeline_spine.py": "351b867ef4af9b025ea9cf8959b8ca22b31d926c752982bb5f3d1e48c7473d69",
    "0001_pipeline_spine.sql": "8cf5d3b83b08e7d585496743b4a5dcf0a728fa4f680c507784c71934ee52e1c1",
    "0001_pipeline_spine_down.sql": "2577c68f26b19e19014bfb1a6617a26a2fcf724a7b27b129183d57afec49932c",
    "0002_halfvec_index.py": "6c1139045c2f800fc83f0a64a17be15db8117fec085715d3a7c208ab0586e798",
    "0002_halfvec_index.sql": "bd53eb1bcc71348971565be71bc0fb6f0c3767905aa0f6caadc53f16ce5b0a64",
    "0002_halfvec_index_down.sql": "a270647044bc02cc0e03a9e0e8d2f254e82862f6245ed6a6c8c1f581a1b39b99",
    "0003_ordered_index_build.py": "2fe487f60e3a8f9687ca2f5fc4c380be9365e30c21a70237f43813bacdd914db",
    "0003_ordered_index_build.sql": "2a8cef3bb3053684d2d7a36d18026382c25e3aa22225b3bde4b31886d61c0fb3",
    "0003_ordered_index_build_down.sql": "5a76f58eef9ed6a3cc0736c4ccc182cbbf0c6fdded33847224bf7c84838cbbac",
    "0004_model_outages.py": "44b8d128c1cba6b09a997d640e5649aa5de6f1aafcab2ccefbb76729af0eb104",
    "0004_model_outages.sql": "78c8352e56653dec8e77d4ef46a94ad997a077fa291fcf7a14f35af2279858ba",
    "0004_model_outages_down.sql": "18b2ff7d369e174bea398a517bf51db87a4adb5415cbeb40fc86e35a9e182798",
    "0005_private_rows.py": "d9b43ed2e7a9a8c3a43a064efc01813e8c6b3c6b8d66d8187bed37b27facfa6f",
    "0005_private_rows.sql": "4300cf650379ff542379f66d7c33f41d95e2a03e716e728f52d786bf904e57ef",
    "0005_private_rows_down.sql": "ac163e15c8068e908ad67f3214a0aefad67aab679b04ed5294e2a3c368fb4516",
    "0006_typed_keys.py": "dd657f6ed91990312d1353b0ecb6042b63f54acaa31bdf3e916cccc8563ed743",
    "0006_typed_keys.sql": "ffcca4a17e0aac28c8766ab7d1adeaab33570b8435c9b3435cb1d90ebfdb8048",
    "0006_typed_keys_down.sql": "672fa40798409649045d31abfd3c47b2de49a284300c9d728a120b057d41090b",
    "0007_schema_changes.py": "4b9be478b0ec5b2a9b8beb495494aaac4c0319319c7de89ac3d6ccaa37512b21",
    "0007_schema_changes.sql": "5ea9a6dd037088c6a1f428d7bde93f6611a1dded6eb005b855572301434ea9dd",
    "0007_schema_changes_down.sql": "98d14058ef5710d65715180aef1347b96ab0cefa46d7d6e08628c7cb2e015e89",
    "0008_restored_tables.py": "52a99629239f2ba1835ec6f1b5b25ee16b764d84e62af71bb89eac4c8f4d11c7",
    "0008_restored_tables.sql": "f1c86dcb92f99b810534d0026af6d15e0f62832174b29927734a27063684658f",
    "0008_restored_tables_down.sql": "7c86256cc532a5ff4aa1b57212cd21fd026e0e35f77caafb8de242f2367126ff",
    "0009_replicated_rows.py": "884ef4eea3215939b853e4857b07cf5cd010a3178497ac5cfa2422c5f64b984f",
    "0009_replicated_rows.sql": "450c85976baf7fa75ac2861a6228f3478b8f4bf4ca73faf852388c82d50837f9",
    "0009_replicated_rows_down.sql": "bb9d74c5347c21a3e69de029229be798a983258945d8753c7267558a9e62e38c",
    "0010_relevance_cutoff.py": "cc5c7bfbaf1f2911051434e534b73a0cc9ffb03ab4590d96eea61a5deff31d1f",
    "0010_relevance_cutoff.sql": "2fd161e610a5b8a73f7bb8c91d04f1cf924b7bb1d5073a0575e241266af64d03",
    "0010_relevance_cutoff_down.sql": "c7831c7f36513911fb74dba6db1176c70d6dd4e0eb8c23bcf2aadf94779f25b9",
    "0011_content_and_query_images.py": "22851c77daa71e0c6aaccdcf31921ad325c4a299102a832ab6bfb488dee42828",
    "0011_content_and_query_images.sql": "78f6a932d3d67cb148dbc2fdefc75cb8d4df6904a8363d07a9ff5c66a5da8126",
    "0011_content_and_query_images_down.sql": "73f03a93600b78bbf24864f7b6c302876151dc9480998b1920aa9752828e4a70",
    "0012_reduced_models.py": "7f63182a16d29b63eb0e43c1a896d86aed0a7a08ecf8335955d4c4721565a682",
    "0012_reduced_models.sql": "bbf315a4f39722e1b632e64b741bb1ecf9682af1afa14cef8fd236fa4ce444a3",
    "0012_reduced_models_down.sql": "94fe9c7b2d9bcb184a08a25d4cadca5cbb1074784335988508b4e746998a03bf",
}
RELEASED_0001 = REPO / "tests" / "fixtures" / "imgembed-0001-as-released.sql.gz"


def test_released_revisions_never_change() -> None:
    from importlib.resources import files

    versions = files("imgembed.migrations.versions")
    present = {entry.name for entry in versions.iterdir() if entry.name[:4].isdigit()}
    assert present == set(RELEASED_REVISION_FILES), "a revision's files are missing here, or a new one is not listed"
    found = {name: hashlib.sha256((versions / name).read_bytes()).hexdigest() for name in RELEASED_REVISION_FILES}
    assert found == RELEASED_REVISION_FILES


def _populate(url: str) -> None:
    """What a user has in a database: a watched table with rows, their vectors, and ready-table rows."""
    with connect(url) as connection:
        watched_shop_with_vectors(connection, 40, seed=11)
        connection.execute("INSERT INTO imgembed.image (uri, label) VALUES ('/nowhere/a.jpg', 'a'), ('/nowhere/b.jpg', 'b')")


def _contents(url: str) -> dict[str, list[tuple[object, ...]]]:
    with connect(url) as connection:
        storage = connection.execute(  # the vector table's bare name, at every revision
            "SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
            "WHERE w.tbl = 'shop'::regclass AND wm.is_default"
        ).fetchone()[0]
        return {
            "vectors": connection.execute(f"SELECT id, embedding::text FROM imgembed.{storage} ORDER BY id").fetchall(),
            "shop": connection.execute("SELECT * FROM shop ORDER BY id").fetchall(),
            "images": connection.execute("SELECT id, uri, label FROM imgembed.image ORDER BY id").fetchall(),
            "jobs": connection.execute("SELECT watch_id, model_id, key, status FROM imgembed.job ORDER BY 1, 2, 3").fetchall(),
            "watches": connection.execute("SELECT id, tbl::text, key_column, key_type, content_column, uri_column, "
                                          "text_column, label_column FROM imgembed.watch ORDER BY id").fetchall(),
        }


def _by_table(url: str, dump: str) -> list[str]:
    """A dump's statements, sorted, with watch ids named by their tables: a database upgraded with
    rows already watched numbers the watches a later revision adds (imgembed.image_query, 0011)
    after the user's own, and pg_dump orders the vector tables by those names."""
    with connect(url) as connection:
        tables = dict(connection.execute("SELECT id, replace(tbl::text, '.', '_') FROM imgembed.watch").fetchall())
    dump = re.sub(r"\bemb_(\d+)_(\d+)", lambda match: f"emb_{tables[int(match[1])]}_{match[2]}", dump)
    dump = re.sub(r"(_on_\w+)\('(\d+)'\)", lambda match: f"{match[1]}('{tables[int(match[2])]}')", dump)
    return sorted(dump.split("\n\n"))


def _watch_ids_as_tables(contents: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    tables = {row[0]: row[1] for row in contents["watches"]}
    return {**contents, "watches": sorted(row[1:] for row in contents["watches"]),
            "jobs": sorted((tables[row[0]], *row[1:]) for row in contents["jobs"])}


def test_database_made_by_released_0001_upgrades_to_a_fresh_install(
    fresh_database: Callable[[str | None], str],
) -> None:
    """A database built by revision 0001 exactly as it was released (its SQL recovered from history),
    holding watched rows and vectors, upgraded to head: its schema is the same as a fresh install's,
    and no row or vector is lost."""
    old = fresh_database(None)
    with psycopg.connect(old, autocommit=True) as connection:
        connection.execute(gzip.decompress(RELEASED_0001.read_bytes()).decode())
    assert migrate.current_revision(old) == "0001"
    _populate(old)
    before = _contents(old)
    # A neighbour who may create objects in public, pgvector's schema, plants look-alikes of every
    # name imgembed's SQL calls before the upgrade: none runs, and nothing of imgembed is bound to one.
    neighbour = f"neighbour_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(old, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {neighbour} LOGIN")
        connection.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {neighbour}")
    with psycopg.connect(as_role(old, neighbour), autocommit=True) as planter:
        create_decoy_log(planter)
        plant_decoys(planter, called_names(shipped_sql()))
    migrate.upgrade(old, register=False)
    assert migrate.current_revision(old) == HEAD_REVISION
    with psycopg.connect(old, autocommit=True) as connection:
        assert decoys_that_ran(connection) == []
        assert foreign_dependencies(connection) == []
        connection.execute(f"DROP OWNED BY {neighbour}")
        connection.execute(f"DROP ROLE {neighbour}")

    fresh = fresh_database(None)
    migrate.upgrade(fresh, register=False)
    _populate(fresh)
    assert _by_table(old, comparable_dump(old)) == _by_table(fresh, comparable_dump(fresh))
    after = _contents(old)
    assert _watch_ids_as_tables(after) == _watch_ids_as_tables(before) | {
        "watches": _watch_ids_as_tables(after)["watches"]}
    assert len(after["vectors"]) == 40 and _watch_ids_as_tables(after) == _watch_ids_as_tables(_contents(fresh))


def test_every_upgrade_applies_the_definitions_again(database_url: str) -> None:
    """A database at the newest revision gets the package's functions, views and grants at every
    `imgembed migrate`, and its data stays: a changed definition needs no new revision."""
    with connect(database_url) as connection:
        connection.execute("INSERT INTO imgembed.image (uri) VALUES ('/nowhere/a.jpg')")
        connection.execute("CREATE OR REPLACE FUNCTION imgembed.in_flight_count() RETURNS bigint "
                           "LANGUAGE sql AS 'SELECT -1::bigint'")
        connection.execute("ALTER FUNCTION imgembed.claim_batch(integer, double precision) SECURITY INVOKER")
        assert connection.execute("SELECT imgembed.in_flight_count()").fetchone()[0] == -1
    migrate.upgrade(database_url)
    with connect(database_url) as connection:
        assert connection.execute("SELECT imgembed.in_flight_count()").fetchone()[0] == 0
        assert connection.execute("SELECT prosecdef FROM pg_proc WHERE oid = "
                                  "'imgembed.claim_batch(integer, double precision)'::regprocedure").fetchone()[0]
        assert connection.execute("SELECT count(*) FROM imgembed.image").fetchone()[0] == 1


def test_sqlalchemy_definitions_match_the_migrated_database(database_url: str) -> None:
    """imgembed.schema describes the tables the migrations make (Alembic's own comparison finds no
    difference), so it can be trusted by applications and by autogenerate."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from imgembed.schema import SCHEMA, metadata

    def ours(name: str | None, kind: str, parents: dict[str, str | None]) -> bool:
        if kind == "schema":
            return name == SCHEMA
        if kind == "table" and name is not None and (name.startswith("emb_") or name == "alembic_version"):
            return False  # vector tables (one per watched table and model, made by watch()), Alembic's own
        return parents.get("schema_name") == SCHEMA

    engine = create_engine(migrate.sqlalchemy_url(database_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "include_schemas": True, "include_name": ours, "compare_server_default": True})
        assert compare_metadata(context, metadata) == []
    engine.dispose()
