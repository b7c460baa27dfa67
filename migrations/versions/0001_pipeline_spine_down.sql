-- Revision 0001, downgrade: frozen as released (the SQL imgembed ran at commit a7ece1c).
-- A released revision never changes: later changes go into a new revision, and functions
-- and views into sql/, which every upgrade to the newest revision applies again.

-- Remove every imgembed object except Alembic's version table (the migration runner drops the
-- schema once that table is empty). Dropping the trigger functions also drops the triggers on
-- watched tables; the watched tables themselves and the vector extension stay.
DO $$
DECLARE
    v_object text;
BEGIN
    FOR v_object IN
        SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'imgembed'::regnamespace
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', v_object);
    END LOOP;
    FOR v_object IN
        SELECT c.oid::regclass::text FROM pg_class c
         WHERE c.relnamespace = 'imgembed'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('DROP VIEW IF EXISTS %s CASCADE', v_object);
    END LOOP;
    FOR v_object IN
        SELECT c.oid::regclass::text FROM pg_class c
         WHERE c.relnamespace = 'imgembed'::regnamespace AND c.relkind IN ('r', 'p')
           AND c.relname <> 'alembic_version'
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %s CASCADE', v_object);
    END LOOP;
END $$;

-- The roles are the cluster's: dropped when no other database still uses them.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['imgembed_reader', 'imgembed_worker'] LOOP
        BEGIN
            EXECUTE format('REVOKE ALL ON SCHEMA imgembed FROM %I', v_role);
            EXECUTE format('DROP ROLE IF EXISTS %I', v_role);
        EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege OR undefined_object THEN
            RAISE NOTICE 'imgembed: role % kept (%)', v_role, SQLERRM;
        END;
    END LOOP;
END $$;
