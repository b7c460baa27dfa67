-- First in every migration, online and in the `--sql` output: every name the migration's SQL
-- uses resolves in pg_catalog and imgembed alone, schemas no other role may create objects in.
-- Never through the migrating role's own search_path: a function or operator that another role
-- planted in public (often pgvector's schema) with a closer argument type than pg_catalog's would
-- otherwise be chosen, and run with the owner's rights, by the migration and by every view it makes.
-- pgvector's objects are named in their schema (@vector@.vector, OPERATOR(@vector@.<=>)).
SET LOCAL search_path = pg_catalog, imgembed, pg_temp;
-- pgvector is created in public where it is missing and the migrating role may.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'vector') THEN
        CREATE EXTENSION vector SCHEMA public;
    END IF;
EXCEPTION WHEN insufficient_privilege OR undefined_file OR invalid_schema_name THEN
    RAISE EXCEPTION 'imgembed needs the pgvector extension in this database (%)', SQLERRM
        USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
END $$;
