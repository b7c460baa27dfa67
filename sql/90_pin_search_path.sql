-- Pin the search_path of every imgembed function (applied last by each migration): objects resolve
-- to pg_catalog, imgembed and the schema holding pgvector, never to what a caller put first.
DO $$
DECLARE
    v_vector_schema text;
    v_function regprocedure;
BEGIN
    SELECT n.nspname INTO v_vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, imgembed, %I, pg_temp',
                       v_function, v_vector_schema);
    END LOOP;
END $$;
