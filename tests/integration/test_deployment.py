"""imgembed deployed the way a DBA deploys a plugin into an application's database: a superuser
only creates the database and the extensions; migrations run as the database's owner; the
application writes with roles that know nothing of imgembed; workers have their own login; readers
are bound by privileges and row-level security. Nothing runs as a superuser after the first step."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from imgembed.db import as_array
from imgembed.local.postgres import EmbeddedPostgres
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, knn_label_votes, knn_votes, wait_for

MODEL = "imgembed-shapes"  # a checkpoint: workers check it against the registered checksum


@dataclass
class Deployment:
    server: EmbeddedPostgres
    database: str
    suffix: str

    def role(self, name: str) -> str:
        return f"{name}_{self.suffix}"

    def url(self, name: str) -> str:
        return self.server.socket_url(self.database, self.role(name))

    def connect(self, name: str) -> psycopg.Connection:
        return psycopg.connect(self.url(name), autocommit=True)


@pytest.fixture
def deployment(pg_server: EmbeddedPostgres) -> Iterator[Deployment]:
    """The superuser's part, and nothing more: the owner role, the database, the extensions."""
    suffix = uuid.uuid4().hex[:8]
    deployed = Deployment(pg_server, f"app_{suffix}", suffix)
    with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
        superuser.execute(f"CREATE ROLE {deployed.role('owner')} LOGIN CREATEROLE")
        superuser.execute(f"CREATE DATABASE {deployed.database} OWNER {deployed.role('owner')}")
        # imgembed's group roles belong to the cluster and may exist already (another database's
        # migration made them): the owner may then hand them out.
        for group in ("imgembed_reader", "imgembed_worker"):
            superuser.execute(f"DO $$ BEGIN CREATE ROLE {group} NOLOGIN; EXCEPTION WHEN duplicate_object THEN END $$")
            superuser.execute(f"GRANT {group} TO {deployed.role('owner')} WITH ADMIN OPTION")
    with psycopg.connect(pg_server.socket_url(deployed.database), autocommit=True) as superuser:
        superuser.execute("CREATE EXTENSION vector")
        superuser.execute(f"CREATE SCHEMA imgembed_dblink AUTHORIZATION {deployed.role('owner')}")
        superuser.execute("CREATE EXTENSION dblink SCHEMA imgembed_dblink")
    yield deployed
    with psycopg.connect(pg_server.socket_url(deployed.database), autocommit=True) as superuser:
        text_role = superuser.execute("SELECT value FROM imgembed.private_setting WHERE name = 'text_request_role'"
                                      ).fetchone()
    with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
        superuser.execute(f"DROP DATABASE IF EXISTS {deployed.database} WITH (FORCE)")
        roles = [row[0] for row in superuser.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s OR rolname = %s ORDER BY rolname = %s",
            (f"%{suffix}", text_role[0] if text_role else "", deployed.role("owner"))).fetchall()]
        for name in roles:  # the owner last: it granted the others their memberships
            superuser.execute(f'DROP ROLE IF EXISTS "{name}"')


def _imgembed(deployed: Deployment, role: str, redis_url: str, *arguments: str,
              cwd: Path = REPO, **settings: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "DATABASE_URL": deployed.url(role), "REDIS_URL": redis_url,
                   "IMGEMBED_MODEL": MODEL, "IMGEMBED_QUEUE": f"deploy-{deployed.suffix}", "IMGEMBED_DEVICE": "cpu",
                   "IMGEMBED_SWEEP_SECONDS": "0.5", "PYTHONUNBUFFERED": "1", **settings}
    return subprocess.Popen([sys.executable, "-m", "imgembed", *arguments], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _keys(connection: psycopg.Connection, query: str, *parameters: object) -> set[int]:
    return {int(row[0]) for row in connection.execute(query, parameters).fetchall()}


def test_a_dba_deployment_with_tenants(deployment: Deployment, redis_url: str, tmp_path: Path) -> None:
    # The owner migrates (and creates imgembed's roles), then sets up the application's side.
    migrated = _imgembed(deployment, "owner", redis_url, "migrate")
    output = migrated.communicate(timeout=300)[0]
    assert migrated.returncode == 0, output
    # Nothing needs a superuser but the optional event triggers, which it says a superuser may add.
    assert [line for line in output.splitlines() if "superuser" in line.lower()
            and not line.startswith("imgembed: event triggers need a superuser")] == [], output
    role = deployment.role
    with deployment.connect("owner") as owner:
        assert not owner.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        owner.execute("CREATE TABLE products (id bigint PRIMARY KEY, photo bytea, colour text, tenant text NOT NULL)")
        owner.execute("ALTER TABLE products ENABLE ROW LEVEL SECURITY")
        owner.execute("CREATE POLICY own_tenant ON products FOR SELECT USING (tenant = current_user)")
        owner.execute(f"CREATE ROLE {role('writer')} LOGIN")
        owner.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON products TO {role('writer')}")
        owner.execute(f"CREATE POLICY writes ON products TO {role('writer')} USING (true) WITH CHECK (true)")
        owner.execute(f"CREATE ROLE {role('embedder')} LOGIN IN ROLE imgembed_worker")
        for tenant in ("alice", "bob", "outsider"):
            owner.execute(f"CREATE ROLE {role(tenant)} LOGIN IN ROLE imgembed_reader")
        owner.execute(f"GRANT SELECT ON products TO {role('alice')}, {role('bob')}")
        owner.execute("SELECT imgembed.watch('products', 'photo', label_column => 'colour')")

    # The application writes with a role that knows nothing of imgembed.
    shapes = random_shapes(16, seed=31)
    tenants = {i: role("alice") if i % 2 == 0 else role("bob") for i in range(16)}
    with deployment.connect("writer") as writer:
        with writer.cursor() as cursor:
            cursor.executemany("INSERT INTO products VALUES (%s, %s, %s, %s)",
                               [(i, shape.png_bytes(), None if i % 4 in (2, 3) else shape.colour, tenants[i])
                                for i, shape in enumerate(shapes)])
        writer.execute("UPDATE products SET photo = %s WHERE id = 0", (shapes[15].png_bytes(),))
        writer.execute("DELETE FROM products WHERE id = 15")

    # Workers and dispatchers log in as the worker role.
    uploads = tmp_path / "uploads"  # where readers' paths may point
    uploads.mkdir()
    uploads.chmod(0o755)
    (uploads / "query.png").write_bytes(shapes[2].png_bytes())
    processes = [_imgembed(deployment, "embedder", redis_url, "dispatch"),
                 _imgembed(deployment, "embedder", redis_url, "worker", IMGEMBED_ALLOWED_ROOTS=str(uploads))]
    try:
        with deployment.connect("owner") as owner:
            wait_for(lambda: owner.execute("SELECT embedded = 15 AND pending + in_flight + failed = 0 FROM imgembed.status "
                                           "WHERE table_name = 'public.products'").fetchone()[0], 180,
                     "the application's rows embedded by the worker login")
            # The owner's analyses: label prompts, known-good rows, a clustering run (by a worker).
            owner.execute("INSERT INTO imgembed.label_prompt (label, prompt) VALUES ('red', 'a red shape'), "
                          "('blue', 'a blue shape')")
            common = Counter(shapes[i].colour for i in range(15) if i % 4 not in (2, 3)).most_common(1)[0][0]
            owner.execute("SELECT imgembed.set_known_good('products', good_label => %s)", (common,))
            owner.execute("SELECT imgembed.calibrate_anomalies('products')")
            run = owner.execute("SELECT imgembed.cluster('products', 3)").fetchone()[0]
            wait_for(lambda: owner.execute("SELECT status = 'done' FROM imgembed.cluster_run WHERE id = %s",
                                           (run,)).fetchone()[0]
                     and owner.execute("SELECT embedded = 2 FROM imgembed.status WHERE table_name = "
                                       "'imgembed.label_prompt' AND is_default").fetchone()[0], 180,
                     "the clustering run and the label prompts")
        alice_keys = {i for i in range(15) if tenants[i] == role("alice")}
        with deployment.connect("alice") as alice:
            assert _keys(alice, "SELECT id FROM imgembed.similar('products', 2::bigint, 20)") == alice_keys - {2}
            assert _keys(alice, "SELECT id FROM imgembed.search_text('products', NULL::bigint, 'a red circle', 20, "
                                "timeout_seconds => 60)") == alice_keys  # a new text, queued through the loopback
            assert _keys(alice, "SELECT id FROM imgembed.recommend('products', ARRAY[2]::bigint[], 20)") == alice_keys - {2}
            # Every other question answers from alice's rows alone.
            pairs = alice.execute("SELECT a, b FROM imgembed.near_duplicates('products', max_distance => 2)").fetchall()
            assert pairs and {int(key) for pair in pairs for key in pair} <= alice_keys
            # Row 4's label from its 5 nearest labelled neighbours among alice's rows, and no one else's
            # (computed here from the vectors and labels alice reads).
            storage = alice.execute("SELECT imgembed.storage_table('products')").fetchone()[0]
            vectors = {int(key): as_array(vector) for key, vector in alice.execute(f"SELECT id, embedding::real[] FROM {storage}")}
            labels = dict(alice.execute("SELECT id, colour FROM products WHERE colour IS NOT NULL AND id <> 4").fetchall())
            assert set(vectors) == alice_keys and set(labels) <= alice_keys
            assert knn_label_votes(alice, "products", "4::bigint") == knn_votes(alice, "products", 4, "id", "colour")
            assert _keys(alice, "SELECT key FROM imgembed.predicted_labels WHERE table_name = 'public.products'"
                         ) == {key for key in alice_keys if key % 4 == 2}
            assert alice.execute("SELECT count(*) FROM imgembed.zero_shot('products', 4::bigint)").fetchone()[0] == 2
            with pytest.raises(psycopg.Error, match="has no vector"):
                alice.execute("SELECT * FROM imgembed.zero_shot('products', 5::bigint)")  # bob's
            assert _keys(alice, "SELECT key FROM imgembed.anomalies WHERE table_name = 'public.products'") <= alice_keys
            assert _keys(alice, "SELECT key FROM imgembed.cluster_member") == alice_keys
            medoids = alice.execute("SELECT medoid_key FROM imgembed.cluster_summary").fetchall()
            assert {int(row[0]) for row in medoids if row[0] is not None} <= alice_keys
            # The same questions of one table, keys in its own type, joined to it without a cast.
            typed = {
                "cluster_member": "SELECT p.id FROM imgembed.cluster_member('products', NULL::bigint) m "
                                  "JOIN products p ON p.id = m.key",
                "predicted_labels": "SELECT p.id FROM imgembed.predicted_labels('products', NULL::bigint) l "
                                    "JOIN products p ON p.id = l.key",
                "near_duplicates": "SELECT p.id FROM imgembed.near_duplicates('products', NULL::bigint, 2) d "
                                   "JOIN products p ON p.id = d.a",
            }
            assert _keys(alice, typed["cluster_member"]) == alice_keys
            assert _keys(alice, typed["predicted_labels"]) == {key for key in alice_keys if key % 4 == 2}
            assert _keys(alice, typed["near_duplicates"]) <= alice_keys
            assert alice.execute("SELECT pg_typeof(medoid_key)::text FROM imgembed.cluster_summary('products', "
                                 "NULL::bigint) LIMIT 1").fetchone()[0] == "bigint"
            status = alice.execute("SELECT table_name, \"rows\" FROM imgembed.status WHERE is_default").fetchall()
            assert ("public.products", len(alice_keys)) in status
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                alice.execute("SELECT * FROM imgembed.text_query")
            alice.execute("INSERT INTO imgembed.interaction (user_id, tbl, item) VALUES ('a', 'products', '2')")
            # Every other way in answers from alice's rows alone too.
            for query, parameters in (
                ("SELECT id FROM imgembed.search_image('products', NULL::bigint, %s, 20, timeout_seconds => 120)",
                 (shapes[2].png_bytes(),)),
                ("SELECT id FROM imgembed.search_image_at('products', NULL::bigint, %s, 20, timeout_seconds => 120)",
                 (str(uploads / "query.png"),)),
                ("SELECT id FROM imgembed.search_hybrid('products', NULL::bigint, 'red', 20, "
                 "text_columns => ARRAY['colour'], timeout_seconds => 120)", ()),
                ("SELECT id FROM imgembed.recommend_for_user('products', NULL::bigint, 'a', 20)", ()),
                ("SELECT id FROM imgembed.similar_to_vector('products', NULL::bigint, "
                 "imgembed.vector_of('products', 2::bigint), 20)", ()),
            ):
                found = _keys(alice, query, *parameters)
                assert found and found <= alice_keys, (query, found)
            joined = alice.execute("SELECT a_id, b_id FROM imgembed.similarity_join('products', 'products', 3)").fetchall()
            assert joined and {int(key) for pair in joined for key in pair} <= alice_keys
            # The prototypes are the means of alice's labelled rows (computed here): the nearest one wins.
            centres = {label: np.mean([vectors[key] for key, colour in labels.items() if colour == label], axis=0)
                       for label in set(labels.values())}
            distances = sorted((float(np.linalg.norm(centre - vectors[4])), label) for label, centre in centres.items())
            label, distance, margin = alice.execute(
                "SELECT * FROM imgembed.classify_prototype('products', 4::bigint)").fetchone()
            assert label == distances[0][1] and distance == pytest.approx(distances[0][0], abs=1e-5)
            assert margin == pytest.approx(distances[1][0] - distances[0][0], abs=1e-5)
        with deployment.connect("bob") as bob:
            assert _keys(bob, "SELECT id FROM imgembed.similar('products', 3::bigint, 20)") <= set(range(1, 15, 2))
            storage = bob.execute("SELECT imgembed.storage_table('products')").fetchone()[0]
            assert _keys(bob, f"SELECT id FROM {storage}") == set(range(1, 15, 2))
            assert bob.execute("SELECT count(*) FROM imgembed.interaction").fetchone()[0] == 0
        # The worker's login reads no table: `imgembed status` says which role it needs, in one line.
        status = _imgembed(deployment, "embedder", redis_url, "status")
        said = status.communicate(timeout=120)[0]
        assert status.returncode == 1 and "imgembed_reader" in said and "Traceback" not in said, said
        with deployment.connect("outsider") as outsider:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                outsider.execute("SELECT * FROM imgembed.similar('products', 2::bigint, 5)")
            assert outsider.execute("SELECT count(*) FROM imgembed.status WHERE table_name = 'public.products'"
                                    ).fetchone()[0] == 0
    finally:
        for process in processes:
            process.terminate()
        logs = "".join(process.communicate(timeout=60)[0] for process in processes)
    assert "Traceback" not in logs, logs[-3000:]


def test_a_table_owners_policies_never_run_with_imgembeds_rights(deployment: Deployment, redis_url: str) -> None:
    """An application owner's table under row-level security, whose policy calls the application
    owner's function (it records who runs it). imgembed refuses to watch it while the policy would
    apply to its owner's reads; once the DBA gives imgembed's owner BYPASSRLS, workers embed every row
    and the policy runs only for the readers, as themselves. Taken away later, new rows wait."""
    migrated = _imgembed(deployment, "owner", redis_url, "migrate")
    assert migrated.wait(timeout=300) == 0, migrated.communicate()[0]
    role = deployment.role
    with deployment.connect("owner") as owner:
        owner.execute(f"CREATE ROLE {role('app')} LOGIN")
        owner.execute(f"GRANT CREATE ON SCHEMA public TO {role('app')}")
        owner.execute(f"CREATE ROLE {role('embedder')} LOGIN IN ROLE imgembed_worker")
        owner.execute(f"CREATE ROLE {role('alice')} LOGIN IN ROLE imgembed_reader")
    shapes = random_shapes(6, seed=5)
    with deployment.connect("app") as app:
        app.execute("CREATE TABLE policy_log (ran_as text DEFAULT current_user)")
        app.execute("GRANT INSERT ON policy_log TO PUBLIC")
        app.execute("CREATE FUNCTION tenant_visible(tenant text) RETURNS boolean LANGUAGE plpgsql AS "
                    "$$BEGIN INSERT INTO public.policy_log DEFAULT VALUES; RETURN tenant = current_user; END$$")
        app.execute("CREATE TABLE parts (id bigint PRIMARY KEY, photo bytea, tenant text)")
        app.execute("ALTER TABLE parts ENABLE ROW LEVEL SECURITY")
        app.execute("CREATE POLICY tenants ON parts FOR SELECT USING (tenant_visible(tenant))")
        app.execute(f"GRANT SELECT, TRIGGER ON parts TO {role('owner')}")  # what imgembed's owner needs to watch it
        app.execute(f"GRANT SELECT ON parts TO {role('alice')}")
        with app.cursor() as cursor:
            cursor.executemany("INSERT INTO parts VALUES (%s, %s, %s)",
                               [(i, shape.png_bytes(), role("alice") if i < 3 else "bob") for i, shape in enumerate(shapes)])
    with deployment.connect("owner") as owner:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security") as refused:
            owner.execute("SELECT imgembed.watch('parts', 'photo')")
        assert f"ALTER ROLE {role('owner')} BYPASSRLS" in (refused.value.diag.message_hint or "")
    with psycopg.connect(deployment.server.socket_url(deployment.database), autocommit=True) as superuser:
        superuser.execute(f"ALTER ROLE {role('owner')} BYPASSRLS")
    processes = [_imgembed(deployment, "embedder", redis_url, "dispatch"),
                 _imgembed(deployment, "embedder", redis_url, "worker")]
    try:
        with deployment.connect("owner") as owner:
            owner.execute("SELECT imgembed.watch('parts', 'photo')")
            wait_for(lambda: owner.execute("SELECT embedded = 6 AND pending + in_flight + failed = 0 FROM imgembed.status "
                                           "WHERE table_name = 'public.parts'").fetchone()[0], 180, "every part embedded")
        with deployment.connect("alice") as alice:
            assert _keys(alice, "SELECT id FROM imgembed.similar('parts', 0::bigint, 10)") == {1, 2}
        with psycopg.connect(deployment.server.socket_url(deployment.database), autocommit=True) as superuser:
            superuser.execute(f"ALTER ROLE {role('owner')} NOBYPASSRLS")
        with deployment.connect("app") as app:
            app.execute("INSERT INTO parts VALUES (6, %s, 'bob')", (shapes[0].png_bytes(),))
        with deployment.connect("owner") as owner:
            reason = wait_for(lambda: owner.execute(
                "SELECT last_error FROM imgembed.job WHERE key = '6' AND status = 'pending' AND last_error IS NOT NULL"
            ).fetchone(), 120, "the new part's job waiting, with the reason")
            assert "cannot read public.parts" in reason[0] and "row-level security" in reason[0], reason
            storage = owner.execute("SELECT imgembed.storage_table('parts')").fetchone()[0]
            assert owner.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 6
            assert owner.execute("SELECT count(*) FROM imgembed.job WHERE status = 'failed'").fetchone()[0] == 0
        with deployment.connect("app") as app:
            assert {row[0] for row in app.execute("SELECT DISTINCT ran_as FROM policy_log")} == {role("alice")}
    finally:
        for process in processes:
            process.terminate()
        logs = "".join(process.communicate(timeout=60)[0] for process in processes)
    assert "Traceback" not in logs, logs[-3000:]


def test_tenants_see_nothing_of_each_others_rows_in_imgembeds_tables(deployment: Deployment, redis_url: str) -> None:
    """Two tenants of one table under row-level security: imgembed's queue, keys written, failures,
    status counts and cluster and anomaly facts show each only what concerns its own rows."""
    migrated = _imgembed(deployment, "owner", redis_url, "migrate")
    assert migrated.wait(timeout=300) == 0, migrated.communicate()[0]
    role = deployment.role
    alice, bob = role("alice"), role("bob")
    with deployment.connect("owner") as owner:
        owner.execute(f"CREATE ROLE {role('embedder')} LOGIN IN ROLE imgembed_worker")
        for tenant in (alice, bob):
            owner.execute(f"CREATE ROLE {tenant} LOGIN IN ROLE imgembed_reader")
        owner.execute("CREATE TABLE photos (id bigint PRIMARY KEY, photo bytea, tenant text NOT NULL, ok boolean)")
        owner.execute("ALTER TABLE photos ENABLE ROW LEVEL SECURITY")
        owner.execute("CREATE POLICY own_tenant ON photos FOR SELECT USING (tenant = current_user)")
        owner.execute(f"GRANT SELECT ON photos TO {alice}, {bob}")
        owner.execute("SELECT imgembed.watch('photos', 'photo')")
        shapes = random_shapes(8, seed=9)
        with owner.cursor() as cursor:  # alice: 0-3; bob: 4-7, and 8 which is no image
            cursor.executemany("INSERT INTO photos VALUES (%s, %s, %s, true)",
                               [(i, shape.png_bytes(), alice if i < 4 else bob) for i, shape in enumerate(shapes)])
        owner.execute("INSERT INTO photos VALUES (8, 'not an image', %s, false)", (bob,))
        assert owner.execute("SELECT sum(cardinality(keys)) FROM imgembed.intake").fetchone()[0] == 9
    with deployment.connect("alice") as connection:  # keys written, not yet jobs: none of them shown
        assert connection.execute("SELECT count(*) FROM imgembed.intake").fetchone()[0] == 0
    processes = [_imgembed(deployment, "embedder", redis_url, "dispatch"),
                 _imgembed(deployment, "embedder", redis_url, "worker")]
    try:
        with deployment.connect("owner") as owner:
            wait_for(lambda: owner.execute("SELECT embedded = 8 AND failed = 1 AND pending + in_flight = 0 "
                                           "FROM imgembed.status WHERE table_name = 'public.photos'").fetchone()[0],
                     180, "eight rows embedded and bob's bad image failed")
            run = owner.execute("SELECT imgembed.cluster('photos', 2)").fetchone()[0]
            wait_for(lambda: owner.execute("SELECT status = 'done' FROM imgembed.cluster_run WHERE id = %s",
                                           (run,)).fetchone()[0], 180, "the clustering run")
            owner.execute("SELECT imgembed.set_known_good('photos', good_column => 'ok')")
            owner.execute("SELECT imgembed.calibrate_anomalies('photos')")
            assert owner.execute("SELECT sum(size) FROM imgembed.cluster_summary").fetchone()[0] == 8
    finally:
        for process in processes:
            process.terminate()
        logs = "".join(process.communicate(timeout=60)[0] for process in processes)
    assert "Traceback" not in logs, logs[-3000:]
    for tenant, keys, failed in ((alice, {0, 1, 2, 3}, set()), (bob, {4, 5, 6, 7, 8}, {8})):
        with psycopg.connect(deployment.server.socket_url(deployment.database, tenant), autocommit=True) as connection:
            assert _keys(connection, "SELECT key FROM imgembed.job") == failed
            assert _keys(connection, "SELECT key FROM imgembed.failures") == failed
            assert connection.execute("SELECT \"rows\", embedded, pending, failed FROM imgembed.status "
                                      "WHERE table_name = 'public.photos'").fetchone() == (
                len(keys), len(keys - failed), 0, len(failed))
            summary = connection.execute("SELECT size, medoid_key FROM imgembed.cluster_summary").fetchall()
            assert sum(size for size, _ in summary) == len(keys - failed)
            assert {int(key) for _, key in summary if key is not None} <= keys
            assert _keys(connection, "SELECT key FROM imgembed.anomalies WHERE table_name = 'public.photos'") <= keys
            assert connection.execute("SELECT count(centre) FROM imgembed.cluster_centre").fetchone()[0] == 2
            for hidden in ("SELECT medoid_key FROM imgembed.cluster_centre", "SELECT size FROM imgembed.cluster_centre",
                           "SELECT good_rows FROM imgembed.anomaly_threshold",
                           "SELECT fitted_rows FROM imgembed.reduction"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    connection.execute(hidden)
