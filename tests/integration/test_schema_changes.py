"""The application changes its own schema under a watch, with real dispatcher and worker processes.
Each case ends with the same check: every row has exactly the vector of its current image, nothing
else has one, and imgembed.status answers for every table."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from imgembed.db import as_array, connect
from imgembed.images.decode import decode_image
from imgembed.local.postgres import EmbeddedPostgres
from imgembed.models.names import parse_model_spec
from imgembed.settings import load_settings
from imgembed.training.synthetic import random_shapes
from imgembed.worker.pytorch.embedding import LoadedModel, load_model
from tests.conftest import REPO, TEST_MODEL, Services, knn_label_votes, knn_votes, wait_for

IMAGES = [shape.png_bytes() for shape in random_shapes(12, seed=21)]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(parse_model_spec(TEST_MODEL), "cpu")


def expected_vector(model: LoadedModel, image: bytes) -> np.ndarray:
    pixels = model.preprocess(decode_image(image, load_settings({}), model.input_size)).unsqueeze(0)
    return model.embed_pixels(pixels)[0]


def settled(db: psycopg.Connection, table: str) -> None:
    wait_for(lambda: db.execute("SELECT embedded = \"rows\" AND pending + in_flight + failed = 0 FROM imgembed.status "
                                "WHERE table_name = %s AND is_default", (table,)).fetchone() == (True,),
             180, f"{table} embedded")


def assert_exact(db: psycopg.Connection, model: LoadedModel, table: str, key: str, image: str) -> None:
    """Every row has the vector of its current image, and nothing else has one; status answers."""
    settled(db, table)
    rows = {k: Path(v).read_bytes() if isinstance(v, str) else bytes(v)
            for k, v in db.execute(f"SELECT {key}, {image} FROM {table} WHERE {image} IS NOT NULL").fetchall()}
    storage = db.execute("SELECT imgembed.storage_table(%s)", (table,)).fetchone()[0]
    vectors = dict(db.execute(f"SELECT id, embedding FROM {storage}").fetchall())
    assert set(vectors) == set(rows)
    wrong = [k for k, picture in rows.items()
             if not np.allclose(as_array(vectors[k]), expected_vector(model, picture), atol=1e-4)]
    assert wrong == []
    assert_status_answers(db)


def assert_status_answers(db: psycopg.Connection) -> None:
    tables = {row[0] for row in db.execute("SELECT table_name FROM imgembed.status").fetchall()}
    assert "imgembed.image" in tables
    db.execute("SELECT * FROM imgembed.failures").fetchall()
    db.execute("SELECT * FROM imgembed.predicted_labels").fetchall()


def make_table(db: psycopg.Connection, name: str, rows: int, *, label: bool = True) -> None:
    db.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, photo bytea, kind text)")
    with db.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {name} VALUES (%s, %s, %s)",
                           [(i, IMAGES[i % len(IMAGES)], f"k{i % 3}") for i in range(rows)])
    db.execute("SELECT imgembed.watch(%s, 'photo', label_column => %s)", (name, "kind" if label else None))


def doctor(services: Services, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgembed", "doctor", *arguments], cwd=REPO, env=services.env(),
                          capture_output=True, text=True, timeout=120)


def test_renames_are_followed_and_drops_end_the_watch(db: psycopg.Connection, services: Services,
                                                       model: LoadedModel) -> None:
    make_table(db, "products", 20)
    make_table(db, "bystander", 5)
    services.start("dispatch")
    services.start("worker")
    settled(db, "public.products")

    # Renames of the image, key and label columns, of the table and of its schema: followed.
    db.execute("ALTER TABLE products RENAME COLUMN photo TO picture")
    db.execute("ALTER TABLE products RENAME COLUMN id TO pid")
    db.execute("ALTER TABLE products RENAME COLUMN kind TO category")
    db.execute("CREATE SCHEMA shop")
    db.execute("ALTER TABLE products RENAME TO goods")
    db.execute("ALTER TABLE goods SET SCHEMA shop")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO shop.goods VALUES (%s, %s, %s)", [(i, IMAGES[i % 7], "k1") for i in range(20, 30)])
    db.execute("UPDATE shop.goods SET picture = %s WHERE pid = 3", (IMAGES[11],))
    db.execute("DELETE FROM shop.goods WHERE pid = 5")
    db.execute("UPDATE shop.goods SET category = 'k2' WHERE pid = 4")  # not re-embedded
    assert_exact(db, model, "shop.goods", "pid", "picture")
    assert knn_label_votes(db, "shop.goods", "3::bigint") == knn_votes(db, "shop.goods", 3, "pid", "category")
    assert db.execute("SELECT table_name, key_column, content_column, label_column FROM imgembed.watch "
                      "WHERE tbl = 'shop.goods'::regclass").fetchone() == ("shop.goods", "pid", "picture", "category")

    # A key or image column of another type is refused at ALTER time, saying what to do.
    with pytest.raises(psycopg.Error, match="unwatch"):
        db.execute("ALTER TABLE shop.goods ALTER COLUMN picture TYPE text USING encode(picture, 'hex')")
    with pytest.raises(psycopg.Error, match="policy"):
        db.execute("ALTER TABLE shop.goods ALTER COLUMN pid TYPE text")

    # A dropped label column: the watch forgets it, labels say there is none.
    db.execute("ALTER TABLE shop.goods DROP COLUMN category")
    with pytest.raises(psycopg.Error, match="has no label column"):
        db.execute("SELECT * FROM imgembed.knn_label('shop.goods', 3::bigint)")
    assert_exact(db, model, "shop.goods", "pid", "picture")

    # A dropped image column ends the watch: vectors, jobs and triggers go; the table's writes go on.
    storage = db.execute("SELECT imgembed.storage_table('shop.goods')").fetchone()[0]
    db.execute("INSERT INTO shop.goods VALUES (40, %s)", (IMAGES[0],))  # queued, then dropped with the column
    db.execute("ALTER TABLE shop.goods DROP COLUMN picture")
    db.execute("INSERT INTO shop.goods VALUES (41)")
    assert db.execute("SELECT to_regclass(%s)", (storage,)).fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM imgembed.watch WHERE table_name = 'shop.goods'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop.goods'::regclass").fetchone()[0] == 0

    # DROP TABLE needs unwatch or CASCADE (a vector table's policy depends on it); with CASCADE the
    # watch goes with it and nothing else is disturbed.
    make_table(db, "doomed", 4)
    settled(db, "public.doomed")
    with pytest.raises(psycopg.Error, match="depend"):
        db.execute("DROP TABLE doomed")
    doomed_storage = db.execute("SELECT imgembed.storage_table('doomed')").fetchone()[0]
    db.execute("DROP TABLE doomed CASCADE")
    assert db.execute("SELECT to_regclass(%s)", (doomed_storage,)).fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM imgembed.watch_problems").fetchone()[0] == 0
    db.execute("INSERT INTO bystander VALUES (100, %s, 'k0')", (IMAGES[3],))
    assert_exact(db, model, "public.bystander", "id", "photo")
    assert db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 0


def test_without_event_triggers_writes_go_on_and_doctor_repairs(db: psycopg.Connection, services: Services,
                                                                 model: LoadedModel, tmp_path: Path) -> None:
    """Where no superuser installed the event triggers: a broken watch never breaks the table's
    writes nor any other table; `imgembed doctor` says what changed and --fix repairs it."""
    db.execute("DROP EVENT TRIGGER imgembed_ddl_end")
    db.execute("DROP EVENT TRIGGER imgembed_sql_drop")
    make_table(db, "products", 12)
    make_table(db, "bystander", 5)
    services.start("dispatch")
    services.start("worker")
    settled(db, "public.products")

    db.execute("ALTER TABLE products RENAME COLUMN photo TO picture")  # followed without event triggers
    db.execute("INSERT INTO products VALUES (50, %s, 'k1')", (IMAGES[9],))
    assert_exact(db, model, "public.products", "id", "picture")
    assert "every watch matches its table" in doctor(services).stdout

    # The images move to files: the image column becomes a location. Until repaired the watch is
    # left out of everything, and the table's writes go on.
    locations = {}
    for key in [*range(12), 50, 60]:
        locations[key] = tmp_path / f"{key}.png"
        locations[key].write_bytes(IMAGES[(key + 1) % len(IMAGES)])
    db.execute("ALTER TABLE products ALTER COLUMN picture TYPE text USING NULL")
    with db.cursor() as cursor:
        cursor.executemany("UPDATE products SET picture = %s WHERE id = %s",
                           [(str(path), key) for key, path in locations.items() if key != 60])
    db.execute("INSERT INTO products VALUES (60, %s, 'k2')", (str(locations[60]),))
    assert_status_answers(db)
    assert "public.products" not in {row[0] for row in db.execute("SELECT table_name FROM imgembed.status")}
    # A dropped table (CASCADE) leaves a watch without a table: every other table still answers.
    make_table(db, "doomed", 3)
    db.execute("DROP TABLE doomed CASCADE")
    assert_status_answers(db)
    db.execute("INSERT INTO bystander VALUES (100, %s, 'k0')", (IMAGES[3],))
    assert_exact(db, model, "public.bystander", "id", "photo")

    report = doctor(services)
    assert report.returncode == 1, report.stderr
    assert "public.products: image column picture is now text, was bytea; --fix will watch it again" in report.stdout
    assert "public.doomed: table public.doomed was dropped; --fix will stop watching it" in report.stdout
    assert "no imgembed event triggers" in report.stdout
    fixed = doctor(services, "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired public.doomed" in fixed.stdout and "repaired public.products" in fixed.stdout
    assert db.execute("SELECT count(*) FROM imgembed.watch_problems").fetchone()[0] == 0
    assert db.execute("SELECT uri_column, label_column FROM imgembed.watch WHERE tbl = 'products'::regclass"
                      ).fetchone() == ("picture", "kind")
    assert_exact(db, model, "public.products", "id", "picture")  # every row embedded again, from its file


def test_copy_upserts_merge_key_updates_and_big_statements(db: psycopg.Connection, services: Services,
                                                           model: LoadedModel) -> None:
    db.execute("CREATE TABLE items (id bigint PRIMARY KEY, photo bytea, note text)")
    db.execute("SELECT imgembed.watch('items', 'photo')")
    services.start("dispatch")
    services.start("worker")
    with db.cursor() as cursor, cursor.copy("COPY items (id, photo, note) FROM STDIN") as copy:
        for i in range(30):
            copy.write_row((i, IMAGES[i % len(IMAGES)], "copied"))
    assert_exact(db, model, "public.items", "id", "photo")
    storage = db.execute("SELECT imgembed.storage_table('items')").fetchone()[0]
    before = dict(db.execute(f"SELECT id, job_id FROM {storage}").fetchall())

    # Upsert: rows 0-9 get the image they have (nothing to do), 10-19 another one, 100-104 are new.
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO items VALUES (%s, %s, 'upserted') ON CONFLICT (id) DO UPDATE SET photo = excluded.photo, "
            "note = excluded.note",
            [(i, IMAGES[i % len(IMAGES)] if i < 10 else IMAGES[(i + 5) % len(IMAGES)], ) for i in
             [*range(20), *range(100, 105)]])
    db.execute(
        "MERGE INTO items t USING (VALUES (20::bigint, %s::bytea), (21, %s), (200, %s)) AS s(id, photo) ON t.id = s.id "
        "WHEN MATCHED AND s.id = 21 THEN DELETE WHEN MATCHED THEN UPDATE SET photo = s.photo "
        "WHEN NOT MATCHED THEN INSERT (id, photo) VALUES (s.id, s.photo)", (IMAGES[1], IMAGES[2], IMAGES[3]))
    db.execute("UPDATE items SET id = id + 1000 WHERE id BETWEEN 22 AND 24")  # new keys: old vectors go
    assert_exact(db, model, "public.items", "id", "photo")
    after = dict(db.execute(f"SELECT id, job_id FROM {storage}").fetchall())
    assert all(after[i] == before[i] for i in range(10)), "an unchanged image is not embedded again"
    assert all(after[i] != before[i] for i in range(10, 20))

    # Statements of 100,000 rows: queued and forgotten in one go (rows without an image cost nothing).
    db.execute("INSERT INTO items SELECT g, CASE WHEN g %% 1000 = 0 THEN %s::bytea END, 'bulk' "
               "FROM generate_series(10000, 109999) g", (IMAGES[6],))
    db.execute("UPDATE items SET note = 'touched' WHERE id >= 10000")
    assert_exact(db, model, "public.items", "id", "photo")
    db.execute("DELETE FROM items WHERE id >= 10000")
    assert_exact(db, model, "public.items", "id", "photo")


def test_awkward_names_and_keys(db: psycopg.Connection, services: Services, model: LoadedModel) -> None:
    db.execute('CREATE SCHEMA "My Shop"')
    db.execute('CREATE TABLE "My Shop"."Product Photos" ("Key" text PRIMARY KEY, "The Photo" bytea, '
               '"Other Photo" bytea, "Label!" text)')
    keys = ["it's", "with space", "ünïcødé ✓", "semi;colon", 'quote"d', "%s %I"]
    with db.cursor() as cursor:
        cursor.executemany('INSERT INTO "My Shop"."Product Photos" VALUES (%s, %s, NULL, %s)',
                           [(key, IMAGES[i], "odd" if i % 2 else None) for i, key in enumerate(keys)])
    table = '"My Shop"."Product Photos"'
    db.execute("SELECT imgembed.watch(%s, 'The Photo', label_column => 'Label!')", (table,))
    services.start("dispatch")
    services.start("worker")
    assert_exact(db, model, table, '"Key"', '"The Photo"')
    similar = db.execute("SELECT id FROM imgembed.similar(%s, %s::text, 10)", (table, "it's")).fetchall()
    assert {row[0] for row in similar} == set(keys) - {"it's"}
    filtered = db.execute("SELECT id FROM imgembed.similar(%s, %s::text, 10, filter => '{\"Label!\": \"odd\"}')",
                          (table, "it's")).fetchall()
    assert {row[0] for row in filtered} == {key for i, key in enumerate(keys) if i % 2}
    assert db.execute("SELECT count(*) FROM imgembed.knn_label(%s, %s::text, 3)", (table, "%s %I")).fetchone()[0] == 1
    with pytest.raises(psycopg.Error, match="already watched with another image column"):
        db.execute("SELECT imgembed.watch(%s, 'Other Photo')", (table,))
    db.execute('UPDATE "My Shop"."Product Photos" SET "The Photo" = %s WHERE "Key" = %s', (IMAGES[10], "ünïcødé ✓"))
    assert_exact(db, model, table, '"Key"', '"The Photo"')


def test_two_migrations_started_at_once(fresh_database, services: Services) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database(None)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION vector")
    environment = {**services.env(), "DATABASE_URL": url}
    runs = [subprocess.Popen([sys.executable, "-m", "imgembed", "migrate"], cwd=REPO, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT count(*) FROM imgembed.model").fetchone()[0] == 1
        assert connection.execute("SELECT count(*) FROM imgembed.watch").fetchone()[0] == 4  # imgembed.image and the query tables


def partitioned(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE parts (id bigint PRIMARY KEY, photo bytea) PARTITION BY RANGE (id)")
    db.execute("CREATE TABLE parts_0 PARTITION OF parts FOR VALUES FROM (0) TO (100)")
    db.execute("CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id)")
    db.execute("CREATE TABLE parts_1a PARTITION OF parts_1 FOR VALUES FROM (100) TO (200)")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO parts VALUES (%s, %s)", [(i, IMAGES[i % 12]) for i in [*range(5), *range(100, 105)]])
    db.execute("SELECT imgembed.watch('parts', 'photo')")


def change_partitions(db: psycopg.Connection) -> None:
    """Writes into partitions directly, new and attached partitions, TRUNCATE of one, DETACH."""
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO parts_0 VALUES (%s, %s)", [(i, IMAGES[i % 12]) for i in range(10, 15)])
        cursor.executemany("INSERT INTO parts_1a VALUES (%s, %s)", [(i, IMAGES[i % 12]) for i in range(110, 113)])
        cursor.executemany("INSERT INTO parts_1 VALUES (%s, %s)", [(i, IMAGES[i % 12]) for i in range(120, 122)])
    db.execute("UPDATE parts_1a SET photo = %s WHERE id = 110", (IMAGES[0],))
    db.execute("DELETE FROM parts_0 WHERE id = 10")
    db.execute("CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (200) TO (300)")
    db.execute("INSERT INTO parts_2 VALUES (200, %s), (201, %s)", (IMAGES[1], IMAGES[2]))
    db.execute("CREATE TABLE parts_3 (id bigint PRIMARY KEY, photo bytea)")
    db.execute("INSERT INTO parts_3 VALUES (300, %s), (301, %s)", (IMAGES[3], IMAGES[4]))
    db.execute("ALTER TABLE parts ATTACH PARTITION parts_3 FOR VALUES FROM (300) TO (400)")
    db.execute("CREATE TABLE parts_4 PARTITION OF parts FOR VALUES FROM (400) TO (500)")
    db.execute("INSERT INTO parts_4 VALUES (400, %s)", (IMAGES[5],))


def finish_partitions(db: psycopg.Connection, model: LoadedModel) -> None:
    assert_exact(db, model, "public.parts", "id", "photo")
    db.execute("TRUNCATE parts_2")  # that partition's vectors go, the others stay
    db.execute("ALTER TABLE parts DETACH PARTITION parts_4")  # its rows leave the watch with their vectors


def test_partitioned_tables(db: psycopg.Connection, services: Services, model: LoadedModel) -> None:
    partitioned(db)
    services.start("dispatch")
    services.start("worker")
    change_partitions(db)
    finish_partitions(db, model)
    assert_exact(db, model, "public.parts", "id", "photo")
    assert db.execute("SELECT count(*) FROM imgembed.watch_problems").fetchone()[0] == 0
    db.execute("INSERT INTO parts_4 VALUES (401, %s)", (IMAGES[6],))  # no longer watched: nothing queued
    assert db.execute("SELECT count(*) FROM imgembed.intake").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM imgembed.job").fetchone()[0] == 0


def test_partitioned_tables_without_event_triggers(db: psycopg.Connection, services: Services,
                                                   model: LoadedModel) -> None:
    db.execute("DROP EVENT TRIGGER imgembed_ddl_end")
    db.execute("DROP EVENT TRIGGER imgembed_sql_drop")
    partitioned(db)
    services.start("dispatch")
    services.start("worker")
    change_partitions(db)
    report = doctor(services).stdout
    assert "partition public.parts_2 has no imgembed triggers" in report and "public.parts_3" in report, report
    assert "watch_problems" not in report
    fixed = doctor(services, "--fix")
    assert fixed.returncode == 0 and "did: give it the triggers" in fixed.stdout, fixed.stdout + fixed.stderr
    finish_partitions(db, model)
    assert "public.parts_4 left the partition tree" in doctor(services).stdout
    doctor(services, "--fix")
    assert_exact(db, model, "public.parts", "id", "photo")
    assert db.execute("SELECT count(*) FROM imgembed.watch_problems").fetchone()[0] == 0


def test_dump_and_restore(db: psycopg.Connection, services: Services, model: LoadedModel,
                          fresh_database, redis_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """pg_dump of an application database with imgembed, its vectors and a queue still to work
    through, restored into a new database: other OIDs, and columns numbered anew (the table had a
    dropped column, which a dump does not keep). Watches, triggers, vectors and the queue go on."""
    from imgembed.local.postgres import postgres_bin_dir

    db.execute("CREATE TABLE shelf (id bigint PRIMARY KEY, gone text, photo bytea, kind text)")
    db.execute("ALTER TABLE shelf DROP COLUMN gone")
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO shelf VALUES (%s, %s, %s)", [(i, IMAGES[i % 12], f"k{i % 2}") for i in range(10)])
    db.execute("SELECT imgembed.watch('shelf', 'photo', label_column => 'kind')")
    workers = [services.start("dispatch"), services.start("worker")]
    settled(db, "public.shelf")
    for process in workers:
        services.stop(process)
    db.execute("INSERT INTO shelf VALUES (10, %s, 'k0'), (11, %s, 'k1')", (IMAGES[10], IMAGES[11]))  # still queued

    dump = tmp_path / "app.dump"
    subprocess.run([str(postgres_bin_dir() / "pg_dump"), "-Fc", "-f", str(dump), services.database_url],
                   check=True, capture_output=True, timeout=120)
    restored_url = fresh_database(None)
    restore = subprocess.run([str(postgres_bin_dir() / "pg_restore"), "-d", restored_url, str(dump)],
                             capture_output=True, text=True, timeout=300)
    assert restore.returncode == 0, restore.stderr[-3000:]

    restored_services = Services(restored_url, redis_url, tmp_path / "restored")
    (tmp_path / "restored").mkdir()
    try:
        with connect(restored_url) as restored:
            numbers = restored.execute("SELECT w.content_attnum, a.attnum FROM imgembed.watch w JOIN pg_attribute a "
                                       "ON a.attrelid = w.tbl AND a.attname = 'photo' WHERE w.tbl = 'shelf'::regclass"
                                       ).fetchone()
            assert numbers[0] != numbers[1]  # the column moved: the watch finds it by name
            restored_services.start("dispatch")
            restored_services.start("worker")
            restored.execute("INSERT INTO shelf VALUES (12, %s, 'k0')", (IMAGES[2],))
            restored.execute("UPDATE shelf SET photo = %s WHERE id = 1", (IMAGES[9],))
            assert_exact(restored, model, "public.shelf", "id", "photo")
            assert knn_label_votes(restored, "shelf", "1::bigint") == knn_votes(restored, "shelf", 1, "id", "kind")
            fixed = subprocess.run([sys.executable, "-m", "imgembed", "doctor", "--fix"], cwd=REPO,
                                   env=restored_services.env(), capture_output=True, text=True, timeout=120)
            assert "public.shelf: the table was made anew" in fixed.stdout, fixed.stdout + fixed.stderr
            assert restored.execute("SELECT content_attnum = %s FROM imgembed.watch WHERE tbl = 'shelf'::regclass",
                                    (numbers[1],)).fetchone()[0]
            restored.execute("ALTER TABLE shelf RENAME COLUMN photo TO picture")  # numbers hold again
            restored.execute("INSERT INTO shelf VALUES (13, %s, 'k1')", (IMAGES[4],))
            assert_exact(restored, model, "public.shelf", "id", "picture")
    finally:
        restored_services.stop_all()


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A second server, the application's primary: it publishes its rows by logical replication."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("publisher"), durable=False, settings={"wal_level": "logical"})
    server.start()
    yield server
    server.stop(mode="immediate")


def replicated_rows(url: str) -> dict[int, bytes | None]:
    with psycopg.connect(url) as connection:
        return {key: None if photo is None else bytes(photo)
                for key, photo in connection.execute("SELECT id, photo FROM products").fetchall()}


def test_logical_replication(db: psycopg.Connection, services: Services, model: LoadedModel,
                             publisher: EmbeddedPostgres) -> None:
    """The application's rows reach this database by logical replication: its primary publishes
    `products` and knows nothing of imgembed; here a subscription applies them. With
    `replicated => true` the rows it applies (its initial copy too) are embedded, and local writes
    still are."""
    products = "CREATE TABLE products (id bigint PRIMARY KEY, photo bytea, kind text)"
    with psycopg.connect(publisher.url(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS shop WITH (FORCE)")
        admin.execute("CREATE DATABASE shop")
    primary_url = publisher.url("shop")
    with psycopg.connect(primary_url, autocommit=True) as primary:
        primary.execute(products)
        with primary.cursor() as cursor:
            cursor.executemany("INSERT INTO products VALUES (%s, %s, 'k')", [(i, IMAGES[i]) for i in range(6)])
        primary.execute("CREATE PUBLICATION shop FOR TABLE products")

    db.execute(products)
    db.execute("SELECT imgembed.watch('products', 'photo', replicated => true)")
    services.start("dispatch")
    services.start("worker")
    connection = f"host=127.0.0.1 port={publisher.port} dbname=shop user=postgres password={publisher.password()}"
    db.execute(f"CREATE SUBSCRIPTION shop CONNECTION '{connection}' PUBLICATION shop")  # db autocommits: no transaction block allowed

    def caught_up() -> None:
        wait_for(lambda: replicated_rows(services.database_url) == replicated_rows(primary_url), 60,
                 "the subscription applied the primary's rows")

    try:
        caught_up()  # the initial copy
        assert_exact(db, model, "public.products", "id", "photo")
        storage = db.execute("SELECT imgembed.storage_table('products')").fetchone()[0]
        before = dict(db.execute(f"SELECT id, job_id FROM {storage}").fetchall())

        with psycopg.connect(primary_url, autocommit=True) as primary:
            primary.execute("INSERT INTO products VALUES (6, %s, 'k'), (7, NULL, 'k')", (IMAGES[6],))
            primary.execute("UPDATE products SET photo = %s WHERE id = 0", (IMAGES[8],))
            primary.execute("UPDATE products SET kind = 'other' WHERE id = 1")  # not an image: nothing to do
            primary.execute("UPDATE products SET id = 30 WHERE id = 3")  # a new key: the old one's vector goes
            primary.execute("UPDATE products SET photo = NULL WHERE id = 4")
            primary.execute("DELETE FROM products WHERE id = 5")
            with primary.cursor() as cursor, cursor.copy("COPY products (id, photo) FROM STDIN") as copy:
                for key in range(100, 110):
                    copy.write_row((key, IMAGES[key % 12]))
        caught_up()
        db.execute("INSERT INTO products VALUES (1000, %s, 'local')", (IMAGES[9],))  # a write of this database's own
        assert_exact(db, model, "public.products", "id", "photo")
        after = dict(db.execute(f"SELECT id, job_id FROM {storage}").fetchall())
        assert after[1] == before[1] and after[2] == before[2], "an unchanged image is not embedded again"
        assert after[0] != before[0]

        with psycopg.connect(primary_url, autocommit=True) as primary:
            primary.execute("TRUNCATE products")
            primary.execute("INSERT INTO products VALUES (1, %s, 'k'), (2, %s, 'k')", (IMAGES[10], IMAGES[11]))
        caught_up()
        db.execute("DELETE FROM products WHERE id = 1000")  # the local row TRUNCATE left
        assert_exact(db, model, "public.products", "id", "photo")
        assert db.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 2

        # Off again: only the statement triggers of local writes are left.
        db.execute("SELECT imgembed.watch('products', 'photo', replicated => false)")
        assert db.execute("SELECT array_agg(tgname::text || ':' || tgenabled::text ORDER BY tgname) FROM pg_trigger "
                          "WHERE tgrelid = 'products'::regclass").fetchone()[0] == [
            "imgembed_delete:O", "imgembed_insert:O", "imgembed_truncate:O", "imgembed_update:O"]
    finally:
        db.execute("DROP SUBSCRIPTION shop")
