"""Running imgembed's SQL files (package data) from Alembic, online or offline (``--sql``).

Two kinds of file:

- a revision's own files, beside it in ``migrations/versions/`` (``0002_halfvec_index.sql`` and
  ``0002_halfvec_index_down.sql``): frozen once released, so a revision means the same thing
  forever (``versions/SHA256SUMS``); a downgrade puts back the definitions the revision it returns
  to released, kept once each in ``released_definitions.tar.xz`` (see ``releases``);
- the definitions in ``sql/`` (functions, views, roles and grants), idempotent, one concern a
  file: applied again, in name order, after every upgrade that ends at the newest revision.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from alembic import op
from alembic.runtime.migration import MigrationContext

from imgembed.migrations.releases import released_definitions


def read_revision_sql(filename: str) -> str:
    """A revision's frozen SQL file."""
    return (files("imgembed.migrations.versions") / filename).read_text(encoding="utf-8")


def definition_files() -> list[str]:
    """The names of the definition files in ``sql/``, in the order they are applied."""
    return sorted(entry.name for entry in files("imgembed.sql").iterdir() if entry.name.endswith(".sql"))


def run_script(context: MigrationContext, script: str) -> None:
    """Run a script of several statements (dollar-quoted bodies allowed) in the migration's
    transaction, or print it in offline mode."""
    if context.as_sql:
        context.impl.static_output(script.rstrip() + "\n")
        return
    # Straight to psycopg without parameters, so '%' and ':' in the script stay untouched.
    assert context.connection is not None, "online migrations have a connection"
    driver_connection = context.connection.connection.driver_connection
    assert driver_connection is not None
    with driver_connection.cursor() as cursor:
        cursor.execute(script)


@cache
def _definition_wrapper() -> str:
    return (files("imgembed.migrations") / "apply_definition.sql").read_text(encoding="utf-8")


def with_vector_schema(script: str, name: str) -> str:
    """The script run with pgvector's schema named where it writes ``@vector@`` (see
    ``apply_definition.sql``): the migration's search_path holds pg_catalog and imgembed only."""
    if "$imgembed_sql$" in script:
        raise ValueError(f"{name} may not contain the quote $imgembed_sql$ that applies it")
    return _definition_wrapper().replace("@definition@", script)


DEFINITIONS_MARK = re.compile(r"^--@definitions (\d{4})$", re.MULTILINE)


def revision_scripts(filename: str) -> list[str]:
    """The scripts one of a revision's frozen files runs as, in order. A line ``--@definitions
    NNNN`` stands for the definitions of ``sql/`` as revision NNNN released them (a downgrade
    puts back the functions, views and grants of the revision it returns to). A part that names
    pgvector's objects as ``@vector@.vector`` runs with that schema put in."""
    script = read_revision_sql(filename)
    parts = DEFINITIONS_MARK.split(script)  # text, revision, text, revision, ..., text
    scripts = []
    for index, part in enumerate(parts):
        if index % 2:
            scripts += [with_vector_schema(text, f"sql/{name} of revision {part}")
                        for name, text in released_definitions(part)]
        elif part.strip():
            scripts.append(with_vector_schema(part, filename) if "@vector@" in part else part)
    return scripts


def apply_revision_sql(filename: str) -> None:
    """Run one of the calling revision's frozen files (called from a revision's upgrade/downgrade)."""
    for script in revision_scripts(filename):
        run_script(op.get_context(), script)


def pin_search_path(context: MigrationContext) -> None:
    """Resolve every name of the migration in pg_catalog and imgembed only (see
    ``pin_search_path.sql``), after creating pgvector where it is missing and the migrating role may."""
    run_script(context, (files("imgembed.migrations") / "pin_search_path.sql").read_text(encoding="utf-8"))


def load_pgvector(context: MigrationContext) -> None:
    """Load pgvector's library in the migration's session (see ``load_pgvector.sql``)."""
    run_script(context, (files("imgembed.migrations") / "load_pgvector.sql").read_text(encoding="utf-8"))


def apply_definitions(context: MigrationContext) -> None:
    """Apply every definition file of ``sql/`` again, each with pgvector's schema named where the
    file writes ``@vector@`` (see ``apply_definition.sql``)."""
    for name in definition_files():
        definition = (files("imgembed.sql") / name).read_text(encoding="utf-8")
        run_script(context, with_vector_schema(definition, f"sql/{name}"))
