"""A hostile neighbour: a role that may create objects in the schema holding pgvector plants decoys
named like every function and operator imgembed's SQL calls. Each decoy writes what it is and who
ran it to ``public.decoy_log`` (any role may append to it), so a test reads afterwards whether any
ran, and as whom."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.resources import files

import psycopg

# Argument lists a decoy is planted with: more specific than pg_catalog's own (variadic "any",
# anyelement, anyarray...) for the calls that resolve among overloads of different types.
DECOY_SIGNATURES = ("text", "name", "integer", "bigint", "text, text", "text, name", "text, name, name",
                    "text, integer", "text, integer, integer", "text, text, text", "text, text, integer",
                    "integer, integer", "double precision", "text[]", "bigint[]", "jsonb", "regclass",
                    "regclass, text", "uuid", "boolean", "oid", "oid, text", "name, text", "name, name, text")
DECOY_OPERATORS = ("=", "<>", "<", ">", "<=", ">=", "||", "+", "-", "*", "/", "<=>", "<->", "#>>", "->>", "?", "@>")
OPERATOR_SIGNATURES = (("text", "text"), ("text", "integer"), ("bigint", "text"), ("text", "bigint"),
                       ("integer", "text"), ("double precision", "text"), ("jsonb", "text"), ("name", "text"),
                       ("text", "name"), ("oid", "oid"))
NOT_A_FUNCTION_NAME = {"select", "from", "where", "and", "or", "not", "in", "as", "on", "join", "when", "then", "else",
                       "case", "end", "values", "exists", "coalesce", "greatest", "least", "nullif", "cast", "any",
                       "all", "array", "row", "filter", "over", "lateral", "using", "returns", "if", "loop", "into",
                       "by", "order", "limit", "set", "update", "insert", "delete", "table", "perform", "return",
                       "raise", "execute", "exception", "with", "recursive", "distinct", "group", "key", "references",
                       "primary", "unique", "check", "default", "partition", "include", "for", "foreach", "elsif",
                       "while", "create", "function", "view", "index", "trigger", "procedure", "type", "like",
                       "between", "is", "window", "declare", "begin", "grant", "revoke", "alter", "drop", "rename",
                       "add", "column", "constraint", "foreign", "sequence", "schema", "role", "extension", "cascade",
                       "restrict", "tablespace", "owner", "authorization", "to", "only", "of", "do", "language",
                       "immutable", "stable", "volatile", "strict", "security", "definer", "invoker",
                       "notice", "warning", "hint", "detail", "errcode", "message", "within", "ordinality",
                       "rows", "range", "numeric", "varchar", "char", "character", "bit", "timestamptz",
                       "timestamp", "interval", "decimal", "float", "vector", "halfvec", "sparsevec", "real",
                       "double", "precision", "setof", "out", "inout", "variadic", "generated", "always",
                       "identity", "storage", "plain", "external", "main", "extended", "statistics", "policy",
                       "publication", "subscription", "aggregate", "operator", "collate", "returning", "conflict",
                       "nothing", "fetch", "first", "next", "offset", "asc", "desc", "nulls", "last", "union",
                       "except", "intersect", "having", "natural", "cross", "full", "inner",
                       "outer"}


def shipped_sql() -> list[str]:
    """Every SQL text imgembed ships: its definitions, its frozen revisions and the migration's own."""
    texts = []
    for package in ("imgembed.sql", "imgembed.migrations.versions", "imgembed.migrations"):
        texts += [entry.read_text(encoding="utf-8") for entry in files(package).iterdir() if entry.name.endswith(".sql")]
    return texts


def called_names(texts: Iterable[str]) -> set[str]:
    """Every bare name called like a function in these SQL texts (comments left out)."""
    code = "\n".join(re.sub(r"--[^\n]*", "", text) for text in texts)
    names = {name.lower() for name in re.findall(r"(?<![\w.$@%])([a-z_][a-z0-9_]*)\s*\(", code, flags=re.IGNORECASE)}
    return {name for name in names - NOT_A_FUNCTION_NAME if not name.startswith(("v_", "p_"))}


def create_decoy_log(connection: psycopg.Connection) -> None:
    connection.execute("CREATE TABLE public.decoy_log (decoy text, ran_as text DEFAULT current_user)")
    connection.execute("GRANT INSERT, SELECT ON public.decoy_log TO PUBLIC")


def plant_decoys(connection: psycopg.Connection, names: Iterable[str]) -> dict[str, int]:
    """Plant a decoy for each name with every signature that can be declared (a signature pgvector
    or imgembed already holds in this schema cannot), and the decoy operators. Returns how many
    decoys each name and operator got."""
    planted: dict[str, int] = {}
    for name in sorted(set(names)):
        planted[name] = 0
        for signature in DECOY_SIGNATURES:
            try:
                with connection.transaction():
                    connection.execute(
                        f"CREATE FUNCTION public.{name}({signature}) RETURNS text LANGUAGE plpgsql AS "
                        f"$$BEGIN INSERT INTO public.decoy_log (decoy) VALUES ('{name}({signature})'); RETURN NULL; END$$")
                planted[name] += 1
            except psycopg.errors.DuplicateFunction:
                pass  # pgvector's own function of that signature
    for operator in DECOY_OPERATORS:
        planted[operator] = 0
        for left, right in OPERATOR_SIGNATURES:
            function = f"decoy_op_{len(planted)}_{planted[operator]}"
            try:
                with connection.transaction():
                    connection.execute(
                        f"CREATE FUNCTION public.{function}({left}, {right}) RETURNS boolean LANGUAGE plpgsql AS "
                        f"$$BEGIN INSERT INTO public.decoy_log (decoy) VALUES ('{operator}({left}, {right})'); "
                        "RETURN false; END$$")
                    connection.execute(f"CREATE OPERATOR public.{operator} (FUNCTION = public.{function}, "
                                       f"LEFTARG = {left}, RIGHTARG = {right})")
                planted[operator] += 1
            except psycopg.errors.DuplicateFunction:
                pass  # pgvector's own operator of those types
    return planted


def decoys_that_ran(connection: psycopg.Connection) -> list[tuple[str, str]]:
    return connection.execute("SELECT decoy, ran_as FROM public.decoy_log ORDER BY 1").fetchall()


# Objects of imgembed (views, functions, defaults, constraints, indexes, triggers) that depend on a
# function, operator or type outside pg_catalog and imgembed that no extension owns: each of these
# would run, or be chosen, under imgembed's owner rights.
FOREIGN_DEPENDENCIES = """
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) AS imgembed_object,
       pg_describe_object(d.refclassid, d.refobjid, 0) AS depends_on
  FROM pg_depend d
  JOIN LATERAL pg_identify_object(d.classid, d.objid, d.objsubid) o ON true
  LEFT JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
  LEFT JOIN pg_operator op ON d.refclassid = 'pg_operator'::regclass AND op.oid = d.refobjid
  LEFT JOIN pg_type t ON d.refclassid = 'pg_type'::regclass AND t.oid = d.refobjid
 WHERE 'imgembed'::regnamespace = coalesce(
           (SELECT c.relnamespace FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
             WHERE d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid),
           (SELECT c.relnamespace FROM pg_attrdef a JOIN pg_class c ON c.oid = a.adrelid
             WHERE d.classid = 'pg_attrdef'::regclass AND a.oid = d.objid),
           (SELECT c.relnamespace FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
             WHERE d.classid = 'pg_trigger'::regclass AND g.oid = d.objid),
           (SELECT n.oid FROM pg_namespace n WHERE n.nspname = o.schema))
   AND coalesce(p.pronamespace, op.oprnamespace, t.typnamespace) NOT IN ('pg_catalog'::regnamespace,
                                                                       'imgembed'::regnamespace)
   AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.refclassid AND e.objid = d.refobjid
                                              AND e.deptype = 'e')
   AND NOT (d.refclassid = 'pg_type'::regclass AND EXISTS (  -- an array type of an extension's type
            SELECT 1 FROM pg_type element JOIN pg_depend e ON e.classid = 'pg_type'::regclass
                      AND e.objid = element.oid AND e.deptype = 'e' WHERE element.typarray = d.refobjid))
 ORDER BY 1, 2
"""


def foreign_dependencies(connection: psycopg.Connection) -> list[tuple[str, str]]:
    return connection.execute(FOREIGN_DEPENDENCIES).fetchall()
