"""Apply the project's ``sql/*.sql`` files from Alembic versions, online or offline (``--sql``)."""

from __future__ import annotations

from pathlib import Path

from alembic import op

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def read_sql(name: str) -> str:
    path = SQL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"migration needs {path}, which is missing from this checkout")
    return path.read_text(encoding="utf-8")


def apply_sql(*names: str) -> None:
    """Run each named file as one script (several statements, dollar-quoted bodies allowed)."""
    for name in names:
        script = read_sql(name)
        if op.get_context().as_sql:
            op.get_context().impl.static_output(script.rstrip() + "\n")
        else:
            # Straight to psycopg without parameters, so '%' and ':' in the script stay untouched.
            driver_connection = op.get_bind().connection.driver_connection
            with driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute(script)
