-- One definition file of sql/, applied with pgvector's objects named in its own schema: the files
-- write them as @vector@.vector, OPERATOR(@vector@.<=>)..., so that imgembed's functions never find
-- an object by a search path that runs through a schema other roles may create objects in.
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$@definition@$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;
