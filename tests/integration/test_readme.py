"""Every SQL and Python example of README.md, run as written, in order, against a real stack: a
migrated database, a dispatcher and a Celery worker embedding with the test model.

A block may follow a marker naming the state it starts from, ``<!-- example: NAME -->``:

- ``products``: a table ``products (id bigint, photo bytea, title, category)`` with 40 rows, not
  watched (the README's first example watches it);
- ``catalogue``: ``products`` (80 rows, 13 and 14 the same image), ``faces`` (text keys, some
  unlabelled) and ``parts`` (labels, some ``ok``) watched and embedded, and 20 rows in
  ``imgembed.image``;
- ``clustered``: the catalogue once every clustering run asked for has finished;
- ``reduced``: the state before, once every reduced model asked for is fitted.

A block without a marker continues from the state the previous one left. Python blocks run with
``Product`` (a mapped class of ``products``) and ``session`` at hand; a block defining ``upgrade``
and ``downgrade`` (an Alembic revision) has both run in an Alembic context.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from imgembed import migrate
from imgembed.training.synthetic import random_shapes
from tests.conftest import REPO, TEST_MODEL, Services, wait_for

README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*example:\s*(\w+)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Statements of the catalogue whose answer may rightly be empty.
MAY_BE_EMPTY = ("WHERE is_anomaly",)


@dataclass
class Example:
    language: str
    code: str
    setup: str | None
    line: int


def readme_examples(text: str) -> list[Example]:
    """The README's sql and python blocks, each with the setup its marker names (if any)."""
    examples = []
    for match in FENCE.finditer(text):
        language = match.group(1)
        if language not in ("sql", "python"):
            continue
        before = text[: match.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        examples.append(Example(language, match.group(2), marker.group(1) if marker else None,
                                text.count("\n", 0, match.start()) + 1))
    return examples


def split_statements(sql: str) -> list[str]:
    """Statements of a block: split at semicolons outside quotes and comments, comments dropped."""
    statements, current, index = [], [], 0
    quoted = False
    while index < len(sql):
        char = sql[index]
        if not quoted and sql.startswith("--", index):
            index = sql.find("\n", index)
            index = len(sql) if index < 0 else index
            continue
        if char == "'":
            quoted = not quoted
        if char == ";" and not quoted:
            statements.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        index += 1
    rest = "".join(current).strip()
    return [statement for statement in [*statements, rest] if statement]


def test_split_statements_keeps_quoted_semicolons_and_drops_comments() -> None:
    assert split_statements("SELECT ';' -- a; comment\n, 2;\nSELECT 3 -- end") == ["SELECT ';' \n, 2", "SELECT 3"]


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    photo: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    title: Mapped[str | None] = mapped_column(sa.Text)
    category: Mapped[str | None] = mapped_column(sa.Text)


@dataclass
class Stack:
    db: psycopg.Connection
    services: Services
    photo_file: Path
    state: str | None = None
    settled: set[str] = field(default_factory=set)

    def ensure(self, setup: str) -> None:
        if setup == self.state:
            return
        SETUPS[setup](self)
        self.state = setup

    def wait_embedded(self, tables: list[str]) -> None:
        wait_for(lambda: all(self.db.execute(
            "SELECT coalesce(bool_and(embedded = \"rows\" AND pending + in_flight + failed = 0), false) "
            "FROM imgembed.status WHERE table_name = %s AND is_default", (table,)).fetchone()[0] for table in tables),
            240, f"{', '.join(tables)} embedded")


def _drop_watched(db: psycopg.Connection, table: str) -> None:
    if db.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]:
        if db.execute("SELECT count(*) FROM imgembed.watch WHERE tbl = %s::regclass", (table,)).fetchone()[0]:
            db.execute("SELECT imgembed.unwatch(%s)", (table,))
        db.execute(f"DROP TABLE {table}")


def _products(stack: Stack, rows: list[int]) -> None:
    db = stack.db
    _drop_watched(db, "products")
    db.execute("CREATE TABLE products (id bigint PRIMARY KEY, photo bytea, title text, category text)")
    shapes = random_shapes(len(rows), seed=11)
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO products VALUES (%s, %s, %s, %s)",
                           [(key, shape.png_bytes(), shape.caption, shape.colour) for key, shape in zip(rows, shapes)])
    db.execute("UPDATE products SET photo = (SELECT photo FROM products WHERE id = 13) WHERE id = 14")


def setup_products(stack: Stack) -> None:
    _products(stack, list(range(1, 41)))


def setup_catalogue(stack: Stack) -> None:
    db = stack.db
    _products(stack, list(range(1, 81)))
    db.execute("SELECT imgembed.watch('products', 'photo', label_column => 'category')")
    for table in ("faces", "parts"):
        _drop_watched(db, table)
    db.execute("CREATE TABLE faces (id text PRIMARY KEY, image bytea, label text)")
    db.execute("CREATE TABLE parts (id bigint PRIMARY KEY, image bytea, label text)")
    faces, parts = random_shapes(30, seed=12), random_shapes(30, seed=13)
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO faces VALUES (%s, %s, %s)",
                           [(f"f-{1070 + i}", face.png_bytes(), face.shape if i % 3 else None)
                            for i, face in enumerate(faces)])
        cursor.executemany("INSERT INTO parts VALUES (%s, %s, %s)",
                           [(i, part.png_bytes(), "ok" if part.colour == "red" else part.colour)
                            for i, part in enumerate(parts)])
        if not stack.db.execute("SELECT count(*) FROM imgembed.image").fetchone()[0]:
            cursor.executemany("INSERT INTO imgembed.image (id, content, label) VALUES (%s, %s, %s)",
                               [(i, shape.png_bytes(), shape.shape) for i, shape in enumerate(random_shapes(20, seed=14), 1)])
    db.execute("SELECT imgembed.watch('faces', 'image', label_column => 'label')")
    db.execute("SELECT imgembed.watch('parts', 'image', label_column => 'label')")
    stack.wait_embedded(["public.products", "public.faces", "public.parts", "imgembed.image"])


def setup_clustered(stack: Stack) -> None:
    if stack.state != "catalogue":
        setup_catalogue(stack)
    wait_for(lambda: stack.db.execute("SELECT count(*) FILTER (WHERE status IN ('pending', 'running')) = 0 "
                                      "AND count(*) FILTER (WHERE status = 'done') > 0 FROM imgembed.cluster_run"
                                      ).fetchone()[0], 240, "the clustering runs")


def setup_reduced(stack: Stack) -> None:
    wait_for(lambda: stack.db.execute("SELECT count(*) FILTER (WHERE status IN ('pending', 'running')) = 0 "
                                      "AND count(*) FILTER (WHERE status = 'done') > 0 FROM imgembed.reductions"
                                      ).fetchone()[0], 240, "the reduced models' fits")


SETUPS: dict[str, Callable[[Stack], None]] = {
    "products": setup_products, "catalogue": setup_catalogue, "clustered": setup_clustered, "reduced": setup_reduced,
}


@pytest.fixture
def stack(db: psycopg.Connection, services: Services) -> Iterator[Stack]:
    services.extra_env["HF_HUB_OFFLINE"] = "1"  # the Alembic example adds a model nobody can download here
    # A photo the server may read (pg_read_binary_file): outside pytest's private folders. The
    # workers read the paths readers give (search_image_at) under IMGEMBED_ALLOWED_ROOTS only.
    folder = Path(tempfile.mkdtemp(prefix="imgembed-readme-"))
    services.extra_env["IMGEMBED_ALLOWED_ROOTS"] = str(folder)
    services.start("dispatch")
    services.start("worker")
    # The README's searches run as written, with search_text's default timeout: the worker's text
    # tower is loaded first, so that they wait on nothing but their own text.
    db.execute("SELECT imgembed.text_vector('a warm-up text', %s, 300)", (TEST_MODEL,))
    photo = folder / "shoe.png"
    random_shapes(1, seed=10)[0].image.save(photo)
    os.chmod(folder, 0o755)
    os.chmod(photo, 0o644)
    yield Stack(db, services, photo)
    photo.unlink()
    folder.rmdir()


def run_sql(stack: Stack, example: Example) -> None:
    code = example.code.replace("/data/shoe.jpg", str(stack.photo_file))
    for statement in split_statements(code):
        try:
            cursor = stack.db.execute(statement)  # type: ignore[arg-type]
        except psycopg.Error as error:
            raise AssertionError(f"README line {example.line}: {statement}\n-> {error}") from error
        if cursor.description is not None:
            rows = cursor.fetchall()
            if example.setup in ("catalogue", "clustered", "reduced") and not any(part in statement for part in MAY_BE_EMPTY):
                assert rows, f"README line {example.line}: no rows from {statement}"


def run_python(stack: Stack, example: Example) -> None:
    engine = sa.create_engine(migrate.sqlalchemy_url(stack.services.database_url))
    try:
        with Session(engine) as session:
            namespace: dict[str, object] = {"Product": Product, "session": session}
            exec(compile(example.code, f"README.md:{example.line}", "exec"), namespace)  # noqa: S102
            if "upgrade" in namespace and "downgrade" in namespace:
                with engine.begin() as connection:
                    with Operations.context(MigrationContext.configure(connection)):
                        namespace["upgrade"]()  # type: ignore[operator]
                        assert connection.execute(sa.text(
                            "SELECT count(*) FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id "
                            "WHERE w.tbl = 'products'::regclass")).scalar_one() == 2
                        namespace["downgrade"]()  # type: ignore[operator]
                        assert connection.execute(sa.text(
                            "SELECT count(*) FROM imgembed.watch WHERE tbl = 'products'::regclass")).scalar_one() == 0
    finally:
        engine.dispose()


def test_readme_examples_run_as_written(stack: Stack) -> None:
    examples = readme_examples(README.read_text(encoding="utf-8"))
    assert len(examples) >= 6 and {example.language for example in examples} == {"sql", "python"}
    for example in examples:
        if example.setup is not None:
            stack.ensure(example.setup)
        if example.language == "sql":
            run_sql(stack, example)
        else:
            run_python(stack, example)
