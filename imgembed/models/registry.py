"""Registering models in the database's model registry (``imgembed.model``)."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

from imgembed.models.names import embedding_dimension, file_sha256, parse_model_spec
from imgembed.models.store import stored_checkpoint

REGISTER_SQL = "SELECT imgembed.register_model(%s, %s, %s, %s, %s, %s, %s)"


def registration(name: str, *, make_default: bool = False, model_dir: Path | None = None) -> tuple[object, ...]:
    """The arguments of imgembed.register_model for ``name``: its dimension read from its
    architecture's config, and the checksum of a local checkpoint, or of the one the model
    directory keeps for it."""
    spec = parse_model_spec(name)
    dim = embedding_dimension(spec)
    checkpoint = spec.checkpoint_path
    stored = stored_checkpoint(model_dir, spec) if model_dir is not None else None
    if stored is not None:
        sha256: str | None = stored.sha256
    else:
        sha256 = file_sha256(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
    return (spec.name, spec.architecture, spec.pretrained, dim, sha256, make_default, spec.embeds_text)


def registration_sql(name: str, *, model_dir: Path | None = None) -> str:
    """The statement that registers ``name``, with its values written out (``migrate --sql``)."""
    values = [sql.Literal(value) for value in registration(name, model_dir=model_dir)]
    return sql.SQL(REGISTER_SQL.replace("%s", "{}")).format(*values).as_string(None) + ";"


def register_model(connection: psycopg.Connection, name: str, *, make_default: bool = False,
                   model_dir: Path | None = None) -> int:
    """Register ``name`` (see ``registration``) and return its id. The first model registered
    becomes the default."""
    row = connection.execute(REGISTER_SQL, registration(name, make_default=make_default, model_dir=model_dir)).fetchone()
    return int(row[0])  # type: ignore[index]


def registered_sha256(connection: psycopg.Connection, name: str) -> str | None:
    """The checksum of the checkpoint file ``name`` was registered with, if it has one."""
    row = connection.execute("SELECT imgembed.model_checksum(%s)", (name,)).fetchone()
    return row[0] if row else None


def default_model(connection: psycopg.Connection) -> str | None:
    row = connection.execute("SELECT name FROM imgembed.model WHERE is_default").fetchone()
    return row[0] if row else None


def list_models(connection: psycopg.Connection) -> list[tuple[object, ...]]:
    """(name, architecture, pretrained, dim, default, tables: 'table (embedded/rows)')."""
    return connection.execute(
        """
        SELECT m.name, m.architecture,
               CASE WHEN m.derived_from IS NULL THEN coalesce(m.pretrained, '(seeded random)')
                    ELSE 'PCA of ' || (SELECT s.name FROM imgembed.model s WHERE s.id = m.derived_from) END,
               m.dim, m.is_default,
               coalesce(string_agg(format('%s%s (%s/%s)', s.table_name, CASE WHEN s.is_default THEN '*' ELSE '' END,
                                          s.embedded, s."rows"), ', ' ORDER BY s.table_name)
                            FILTER (WHERE s.table_name IS NOT NULL), '-')
          FROM imgembed.model m
          LEFT JOIN imgembed.status s ON s.model = m.name
                AND s.table_name NOT IN ('imgembed.text_query', 'imgembed.label_prompt', 'imgembed.image_query')
         GROUP BY m.id ORDER BY m.name
        """
    ).fetchall()


def tables_on_other_models(connection: psycopg.Connection, model: str) -> list[tuple[str, str]]:
    """(table, its default model) for each watched image table whose default is not ``model``."""
    return [(str(row[0]), str(row[1])) for row in connection.execute(
        "SELECT w.table_name, m.name FROM imgembed._live_watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id "
        "AND wm.is_default JOIN imgembed.model m ON m.id = wm.model_id "
        "WHERE w.tbl <> ALL (imgembed._query_tables()) AND m.name <> %s ORDER BY w.table_name", (parse_model_spec(model).name,)
    )]


def image_tables(connection: psycopg.Connection) -> list[str]:
    return [row[0] for row in connection.execute(
        "SELECT table_name FROM imgembed._live_watch WHERE tbl <> ALL (imgembed._query_tables()) ORDER BY table_name"
    )]


def unfinished_jobs(connection: psycopg.Connection, model: str, tables: list[str]) -> int:
    return int(connection.execute(
        "SELECT coalesce(sum(pending + in_flight), 0) FROM imgembed.status WHERE model = %s AND table_name = ANY (%s)",
        (model, tables),
    ).fetchone()[0])  # type: ignore[index]


def wait_for_backfill(
    connection: psycopg.Connection, model: str, tables: list[str], timeout: float | None = None,
    desc: str | None = None,
) -> None:
    """Block with a progress bar (rate, ETA) until no row of `tables` waits for `model`. A model the
    live workers cannot load ends the wait at once, with their reason (its rows wait for it)."""
    import time

    from tqdm import tqdm

    from imgembed.errors import ImgembedError

    total = unfinished_jobs(connection, model, tables)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=total, desc=desc or f"backfilling {model}", unit="img") as progress:
        while True:
            remaining = unfinished_jobs(connection, model, tables)
            progress.total = max(progress.total, remaining)
            progress.n = progress.total - remaining
            progress.refresh()
            if remaining == 0:
                return
            outage = connection.execute("SELECT reason FROM imgembed.unavailable_models WHERE model = %s LIMIT 1",
                                        (model,)).fetchone()
            if outage is not None:
                raise ImgembedError(f"the workers cannot load {model}: {outage[0]}; its {remaining} rows wait for it "
                                    "(imgembed status shows when it loads)")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{remaining} rows still to embed with {model} after {timeout}s")
            time.sleep(0.5)


def wait_for_fit(connection: psycopg.Connection, model: str, timeout: float, poll_seconds: float = 0.5
                 ) -> tuple[int, float]:
    """Wait until a reduced model's fit is done (imgembed.reduce): the rows it learnt from and the
    share of variance it keeps. A failed fit raises ImgembedError with its reason, as does one still
    waiting after ``timeout`` seconds."""
    import time

    from imgembed.errors import ImgembedError

    deadline = time.monotonic() + timeout
    while True:
        status, error, fitted_rows, kept = connection.execute(
            "SELECT status, error, fitted_rows, explained_variance FROM imgembed.reductions WHERE model = %s",
            (model,)).fetchone()  # type: ignore[misc]
        if status == "done":
            return int(fitted_rows), float(kept)
        if status == "failed":
            raise ImgembedError(f"the fit of {model} failed: {error}")
        if time.monotonic() > deadline:
            raise ImgembedError(f"{model} is still {status} after {timeout:.0f}s (is a worker running?)")
        time.sleep(poll_seconds)
