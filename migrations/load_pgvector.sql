-- Run before any revision: load pgvector's library in this session, so that its settings
-- (hnsw.ef_search, hnsw.iterative_scan...) are known ones. A role that is not a superuser may name
-- a setting in CREATE FUNCTION ... SET only once its library has defined it; the extension itself
-- is usually created by a superuser in another session, which leaves this one without it.
DO $$
DECLARE
    v_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                       WHERE e.extname = 'vector');
BEGIN
    IF v_schema IS NOT NULL THEN
        EXECUTE format('SELECT %L::%I.vector', '[0]', v_schema);
    END IF;
END $$;
