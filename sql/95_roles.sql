-- Roles and privileges (least privilege).
--   imgembed_reader: search functions and views; changes nothing (request_text excepted: it
--                    queues a text, through a SECURITY DEFINER function).
--   imgembed_worker: claims jobs, reads the claimed rows' image columns, writes vectors, all
--                    through SECURITY DEFINER functions; no direct access to any table.
-- The application's own role keeps its rights. SECURITY DEFINER functions run as the role that
-- ran the migration: run migrations as the database's owner role, not as a superuser.
-- Roles belong to the whole cluster: created here when the migrating role may (CREATEROLE);
-- otherwise a NOTICE says what a DBA must run.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['imgembed_reader', 'imgembed_worker'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'imgembed: cannot create role % (ask a DBA: CREATE ROLE % NOLOGIN;) then rerun imgembed migrate',
                    v_role, v_role;
            END;
        END IF;
    END LOOP;
END $$;

-- Functions the worker and dispatcher call run as their owner; nobody else may call them.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN ('expand_intake', 'claim_batch', 'start_claim', 'release_claim', 'recover_expired', 'in_flight_count',
                             'claimed_images', 'finish_batch', 'requeue_claim', 'claim_cluster_run', 'cluster_run_spec',
                             'cluster_input',
                             'finish_cluster_run', 'fail_cluster_run', 'worker_beat', 'model_checksum')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO imgembed_worker', v_function);
        END IF;
    END LOOP;
    -- The triggers on watched tables run as their owner too: an application role that may write a
    -- watched table needs nothing of imgembed. Nobody calls them directly.
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN ('_on_insert', '_on_update', '_on_delete', '_on_truncate')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
    -- Readers may queue a text for search_text, nothing else; nobody else may.
    ALTER FUNCTION imgembed.request_text(text) SECURITY DEFINER;
    REVOKE ALL ON FUNCTION imgembed.request_text(text) FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT EXECUTE ON FUNCTION imgembed.request_text(text) TO imgembed_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA imgembed TO imgembed_reader;
        REVOKE SELECT ON imgembed.alembic_version FROM imgembed_reader;
    END IF;
END $$;
