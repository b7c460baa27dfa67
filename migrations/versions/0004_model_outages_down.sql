-- Revision 0004, downgrade: back to revision 0003's heartbeat, workers view and worker_beat.
DROP VIEW IF EXISTS imgembed.unavailable_models;
DROP FUNCTION IF EXISTS imgembed.requeue_claim(uuid, bigint[], text, double precision);
DROP FUNCTION IF EXISTS imgembed.worker_beat(text, integer, text, text[], bigint, jsonb);
DROP VIEW IF EXISTS imgembed.workers;
ALTER TABLE imgembed.worker_heartbeat DROP COLUMN IF EXISTS unavailable;

CREATE VIEW imgembed.workers AS
SELECT h.worker, h.pid, h.device, h.models, h.batches, h.started_at, h.last_seen,
       h.last_seen > now() - interval '30 seconds' AS alive
  FROM imgembed.worker_heartbeat h;

CREATE FUNCTION imgembed.worker_beat(
    p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO imgembed.worker_heartbeat AS h (worker, pid, device, models, batches)
    VALUES (p_worker, p_pid, p_device, p_models, p_batches)
    ON CONFLICT (worker) DO UPDATE
       SET pid = excluded.pid, device = excluded.device, models = excluded.models, batches = excluded.batches,
           last_seen = now();
    DELETE FROM imgembed.worker_heartbeat WHERE last_seen < now() - interval '1 day';
$$;

-- Search paths pinned, and privileges, as revision 0003 left them.
-- Pin the search_path of every imgembed function (applied last by each migration): objects resolve
-- to pg_catalog and imgembed, never to what a caller put first; pgvector's are named in its schema.
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
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, imgembed, pg_temp',
                       v_function, v_vector_schema);
    END LOOP;
END $$;

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
                             'claimed_images', 'finish_batch', 'claim_cluster_run', 'cluster_run_spec', 'cluster_input',
                             'finish_cluster_run', 'fail_cluster_run', 'worker_beat')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO imgembed_worker', v_function);
        END IF;
    END LOOP;
    -- Readers may queue a text for search_text, nothing else.
    ALTER FUNCTION imgembed.request_text(text) SECURITY DEFINER;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA imgembed TO imgembed_reader;
        REVOKE SELECT ON imgembed.alembic_version FROM imgembed_reader;
    END IF;
END $$;
