-- Pin the search_path of every imgembed function (applied after the others): names resolve in
-- pg_catalog and imgembed only, schemas no other role may create objects in, never in what a
-- caller put first nor in the schema holding pgvector (a public one, often): pgvector's objects
-- are named in their schema (@vector@.vector, OPERATOR(@vector@.<=>)), and with their exact
-- argument types, so that no object another role creates there is ever chosen instead.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, imgembed, pg_temp', v_function);
    END LOOP;
END $$;
