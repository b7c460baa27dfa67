-- Roles and privileges (least privilege).
--   imgembed_reader: the search functions and views, which show a role only the rows of watched
--                    tables it may SELECT (privileges and row-level security carry over); it
--                    changes nothing, but may queue a text (request_text) and keep its own
--                    interactions (likes, dislikes), which no other role sees.
--   imgembed_worker: claims jobs, reads the claimed rows' image columns, writes vectors, all
--                    through SECURITY DEFINER functions; no direct access to any table.
--   imgembed_text_<database oid>: the login of the loopback connection of search_text and
--                    search_image in this database; it may only queue a text or a query image.
--                    Its password is made here, and kept where only the owner reads it.
-- The application's own roles keep their rights and need nothing of imgembed to write watched
-- tables. SECURITY DEFINER functions run as the role that ran the migration: run migrations as
-- the database's owner role, not as a superuser. Roles belong to the whole cluster: created here
-- when the migrating role may (CREATEROLE); otherwise a NOTICE says what a DBA must run.
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

-- The loopback login of search_text in this database. Its password is made once and kept: copies
-- of this database (CREATE DATABASE ... TEMPLATE) share the role and the password; a database
-- restored where the role is missing gets it back with the password it kept.
DO $$
DECLARE
    v_role text := imgembed._text_request_role();
    v_password text := (SELECT s.value FROM imgembed.private_setting s WHERE s.name = 'text_request_password');
BEGIN
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            v_password := coalesce(v_password, replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
            EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', v_role, v_password);
        ELSIF v_password IS NULL THEN
            v_password := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
            EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', v_role, v_password);
        END IF;
        INSERT INTO imgembed.private_setting (name, value)
        VALUES ('text_request_role', v_role), ('text_request_password', v_password)
        ON CONFLICT (name) DO UPDATE SET value = excluded.value;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'imgembed: cannot create the loopback login % (%); search_text of a new text then needs '
                     'imgembed.request_text() in its own transaction first. A DBA may run imgembed migrate once as a '
                     'role with CREATEROLE (or ALTER ROLE % CREATEROLE), which makes it', v_role, SQLERRM, current_user;
    END;
END $$;

-- Functions that run as their owner, and who may call them.
DO $$
DECLARE
    v_function regprocedure;
    v_callers text[];
    v_role_name text;
BEGIN
    FOR v_function, v_callers IN
        SELECT p.oid::regprocedure,
               CASE WHEN p.proname IN ('_request_text', '_request_image') THEN ARRAY['imgembed_reader', imgembed._text_request_role()]
                    WHEN p.proname IN ('_text_state', '_request_text_elsewhere', '_image_state', '_request_image_elsewhere',
                                       '_forget_queries')
                         THEN ARRAY['imgembed_reader']
                    WHEN p.proname IN ('_on_insert', '_on_update', '_on_delete', '_on_truncate', '_on_truncate_partition',
                                       '_on_replicated_row', '_on_ddl_end', '_on_sql_drop') THEN ARRAY[]::text[]
                    ELSE ARRAY['imgembed_worker'] END
          FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN (
               -- the worker's and the dispatcher's
               'expand_intake', 'claim_batch', 'start_claim', 'release_claim', 'recover_expired', 'in_flight_count',
               'claimed_images', 'finish_batch', 'vectors_by_content', 'requeue_claim', 'backlog', 'claim_cluster_run', 'cluster_run_spec',
               'cluster_input', 'finish_cluster_run', 'fail_cluster_run', 'worker_beat', 'model_checksum',
               'claim_reduction', 'reduction_spec', 'reduction_input', 'finish_reduction', 'fail_reduction',
               -- the triggers on watched tables, and the event triggers: nobody calls them, they fire
               '_on_insert', '_on_update', '_on_delete', '_on_truncate', '_on_truncate_partition', '_on_replicated_row',
               '_on_ddl_end', '_on_sql_drop',
               -- texts and query images, which no reader may list: each role asks, learns and forgets
               -- about its own, and dispatchers expire them
               '_request_text', '_text_state', '_request_text_elsewhere',
               '_request_image', '_image_state', '_request_image_elsewhere', '_forget_queries', 'expire_queries')
    LOOP
        -- Row-level security off: no policy of a watched table, nor a function it calls, runs with the
        -- owner's rights (a table where it would apply is refused: imgembed._require_rows_readable).
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET row_security = off', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        FOREACH v_role_name IN ARRAY v_callers LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role_name) THEN
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_function, v_role_name);
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- The readers' ways to ask for a text or query image, and to forget theirs: they pass the calling
-- role on to the functions with owner rights above, which check it.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN ('request_text', 'request_image', 'request_image_at', 'forget_queries')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = imgembed._text_request_role()) THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', v_function, imgembed._text_request_role());
        END IF;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO imgembed_reader', v_function);
        END IF;
    END LOOP;
END $$;

-- Rows of imgembed's own tables that name rows of watched tables: a role sees those of the tables
-- it may read. Vector tables go further, row by row (imgembed._secure_storage). The owner sees all.
DO $$
DECLARE
    v_table text;
    v_link record;
BEGIN
    -- Jobs name one row each: under row-level security a role sees the jobs of its rows. Keys still
    -- in the intake are written a statement at a time: under row-level security a role sees none.
    ALTER TABLE imgembed.job ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.job;
    DROP POLICY IF EXISTS visible_rows ON imgembed.job;
    CREATE POLICY visible_rows ON imgembed.job FOR SELECT
        USING (imgembed._table_readable(watch_id)
               AND (NOT imgembed._rows_filtered(watch_id) OR imgembed._row_visible(watch_id, key)));
    ALTER TABLE imgembed.intake ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.intake;
    DROP POLICY IF EXISTS visible_rows ON imgembed.intake;
    CREATE POLICY visible_rows ON imgembed.intake FOR SELECT
        USING (imgembed._table_readable(watch_id) AND NOT imgembed._rows_filtered(watch_id));
    FOREACH v_table IN ARRAY ARRAY['cluster_run', 'anomaly_threshold', 'cluster_centre'] LOOP
        EXECUTE format('ALTER TABLE imgembed.%I ENABLE ROW LEVEL SECURITY', v_table);
        EXECUTE format('DROP POLICY IF EXISTS readable_tables ON imgembed.%I', v_table);
        EXECUTE format('CREATE POLICY readable_tables ON imgembed.%I FOR SELECT USING (imgembed._table_readable(%s))',
                       v_table, CASE v_table WHEN 'cluster_centre'
                                     THEN '(SELECT r.watch_id FROM imgembed.cluster_run r WHERE r.id = run_id)'
                                     ELSE 'watch_id' END);
    END LOOP;
    -- Cluster members and map coordinates name rows one by one: a role sees those it may read.
    ALTER TABLE imgembed.cluster_member ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.cluster_member;
    DROP POLICY IF EXISTS visible_rows ON imgembed.cluster_member;
    CREATE POLICY visible_rows ON imgembed.cluster_member FOR SELECT
        USING (imgembed._row_visible((SELECT r.watch_id FROM imgembed.cluster_run r WHERE r.id = run_id), key));
    ALTER TABLE imgembed.projection ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.projection;
    DROP POLICY IF EXISTS visible_rows ON imgembed.projection;
    CREATE POLICY visible_rows ON imgembed.projection FOR SELECT USING (imgembed._row_visible(watch_id, key));
    -- Interactions (likes, purchases...) are each role's own.
    ALTER TABLE imgembed.interaction ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS own_rows ON imgembed.interaction;
    CREATE POLICY own_rows ON imgembed.interaction USING (role_name = current_user) WITH CHECK (role_name = current_user);
    FOR v_link IN SELECT w AS watch, wm.storage_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
    LOOP
        PERFORM imgembed._secure_storage(v_link.watch, v_link.storage_table);
    END LOOP;
END $$;

-- Schema and table privileges.
DO $$
BEGIN
    REVOKE ALL ON SCHEMA imgembed FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = imgembed._text_request_role()) THEN
        EXECUTE format('GRANT USAGE ON SCHEMA imgembed TO %I', imgembed._text_request_role());
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA imgembed TO imgembed_reader;
        -- Not for readers: Alembic's bookkeeping, the owner's settings, everyone's texts and query
        -- images, and the heartbeats (imgembed.workers shows them).
        REVOKE SELECT ON imgembed.alembic_version, imgembed.private_setting, imgembed.text_query,
                         imgembed.image_query, imgembed.query_request, imgembed.worker_heartbeat FROM imgembed_reader;
        -- Facts about rows across tenants stay the owner's: a cluster's size and most central row,
        -- how many good rows calibrated a threshold, how many vectors a reduction learnt from. The
        -- views show each role these of the rows it may read (cluster_summary, reductions).
        REVOKE SELECT ON imgembed.cluster_centre, imgembed.anomaly_threshold, imgembed.reduction FROM imgembed_reader;
        GRANT SELECT (run_id, cluster, centre) ON imgembed.cluster_centre TO imgembed_reader;
        GRANT SELECT (watch_id, model_id, k, quantile, threshold, calibrated_at) ON imgembed.anomaly_threshold
            TO imgembed_reader;
        EXECUTE (SELECT format('GRANT SELECT (%s) ON imgembed.reduction TO imgembed_reader',
                               string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum))
                   FROM pg_attribute a
                  WHERE a.attrelid = 'imgembed.reduction'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                    AND a.attname <> 'fitted_rows');
        GRANT INSERT, DELETE ON imgembed.interaction TO imgembed_reader;
        -- No sequence: readers' rows (interactions) take identity values, which need none, and a
        -- sequence a reader may advance could be run to its end.
        REVOKE USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA imgembed FROM imgembed_reader;
    END IF;
END $$;
