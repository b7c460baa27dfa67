-- Revision 0002, downgrade: frozen as released (the SQL imgembed ran at commit 966a211).
-- A released revision never changes: later changes go into a new revision, and functions
-- and views into sql/, which every upgrade to the newest revision applies again.

-- Revision 0002, downgrade: back to revision 0001's full-precision HNSW index (half precision
-- above 2,000 dimensions), TOASTed vectors, and the search functions that match that index.
DROP FUNCTION IF EXISTS imgembed.rebuild_index(regclass, text, integer, integer);

DO $$
DECLARE
    v_table record;
BEGIN
    FOR v_table IN
        SELECT wm.storage_table, m.dim FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
    LOOP
        EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_table.storage_table || '_hnsw');
        EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE EXTERNAL', v_table.storage_table);
        IF v_table.dim <= 2000 THEN
            EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw (embedding @vector@.vector_cosine_ops)',
                           v_table.storage_table || '_hnsw', v_table.storage_table);
        ELSE
            EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw ((embedding::@vector@.halfvec(%s)) @vector@.halfvec_cosine_ops)',
                           v_table.storage_table || '_hnsw', v_table.storage_table, v_table.dim);
        END IF;
    END LOOP;
END $$;

DROP FUNCTION IF EXISTS imgembed._create_index(text, integer, integer, integer);
DROP FUNCTION IF EXISTS imgembed._ef_search();

-- Revision 0001's definitions of the functions revision 0002 changed.
CREATE OR REPLACE FUNCTION imgembed._attach_model(
    p_watch imgembed.watch,
    p_model imgembed.model,
    p_make_default boolean
) RETURNS imgembed.watch_model
LANGUAGE plpgsql AS $$
DECLARE
    v_storage text := imgembed._storage_name(p_watch.id, p_model.id);
    v_link imgembed.watch_model;
    v_queued bigint;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model WHERE watch_id = p_watch.id AND model_id = p_model.id;
    IF FOUND THEN
        RETURN v_link;
    END IF;
    EXECUTE format(
        'CREATE TABLE imgembed.%I (id %s PRIMARY KEY, embedding @vector@.vector(%s) NOT NULL, '
        'job_id bigint NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now())',
        v_storage, p_watch.key_type, p_model.dim);
    IF p_model.dim <= 2000 THEN
        EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw (embedding @vector@.vector_cosine_ops)',
                       v_storage || '_hnsw', v_storage);
    ELSE
        -- HNSW indexes vectors up to 2,000 dimensions; halfvec goes to 4,000.
        EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw ((embedding::@vector@.halfvec(%s)) @vector@.halfvec_cosine_ops)',
                       v_storage || '_hnsw', v_storage, p_model.dim);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        EXECUTE format('GRANT SELECT ON imgembed.%I TO imgembed_reader', v_storage);
    END IF;
    INSERT INTO imgembed.watch_model (watch_id, model_id, storage_table, is_default)
    VALUES (p_watch.id, p_model.id, v_storage,
            p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.watch_model WHERE watch_id = p_watch.id))
    RETURNING * INTO v_link;

    EXECUTE imgembed._enqueue_sql(p_watch, format('%s n', p_watch.tbl), 'true', p_model.id);
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    -- Text queries and label prompts are embedded by every model an image table uses.
    IF p_watch.text_column IS NULL THEN
        PERFORM imgembed._attach_model(text_watch, p_model, false)
           FROM imgembed.watch text_watch WHERE text_watch.text_column IS NOT NULL;
    END IF;
    RETURN v_link;
END $$;

CREATE OR REPLACE FUNCTION imgembed._knn(
    p_watch imgembed.watch,
    p_link imgembed.watch_model,
    p_query @vector@.vector,
    p_k integer,
    p_exclude text[] DEFAULT '{}',
    p_filter jsonb DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_exact boolean DEFAULT false,
    p_ef_search integer DEFAULT NULL,
    p_after_distance double precision DEFAULT NULL,
    p_after_id text DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql
SET hnsw.iterative_scan = 'strict_order'
AS $$
DECLARE
    v_dim integer;
    v_filter text := imgembed._filter_sql(p_watch, p_filter, 4);
    v_distance text;
    v_template text;
    v_ids text[];
    v_distances double precision[];
    v_previous_ef text := current_setting('hnsw.ef_search', true);
BEGIN
    IF p_k IS NULL OR p_k < 1 THEN
        RAISE EXCEPTION 'k must be at least 1, got %', p_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_query IS NULL THEN
        RAISE EXCEPTION 'the query vector is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT dim INTO v_dim FROM imgembed.model WHERE model.id = p_link.model_id;
    IF @vector@.vector_dims(p_query) <> v_dim THEN
        RAISE EXCEPTION 'query vector has % dimensions but the model has %', @vector@.vector_dims(p_query), v_dim
            USING ERRCODE = 'data_exception';
    END IF;
    v_distance := CASE WHEN v_dim <= 2000 THEN 'e.embedding OPERATOR(@vector@.<=>) $1'
                       ELSE format('e.embedding::@vector@.halfvec(%1$s) OPERATOR(@vector@.<=>) $1::@vector@.halfvec(%1$s)', v_dim) END;
    -- %%s below is the ORDER BY, filled per path.
    v_template := format(
        'SELECT array_agg(q.id ORDER BY q.d, q.id), array_agg(q.d ORDER BY q.d, q.id) FROM ('
        ' SELECT e.id::text AS id, (%1$s)::float8 AS d FROM imgembed.%2$I e %3$s'
        ' WHERE e.id::text <> ALL ($3) AND (%4$s) AND (%5$s) AND (%6$s) ORDER BY %%s LIMIT $2) q',
        v_distance,
        p_link.storage_table,
        CASE WHEN v_filter IS NULL AND p_condition IS NULL THEN ''
             ELSE format('JOIN %s s ON s.%I = e.id', p_watch.tbl, p_watch.key_column) END,
        coalesce(v_filter, 'true'),
        coalesce(p_condition, 'true'),
        CASE WHEN p_after_distance IS NULL THEN 'true'
             ELSE format('(%1$s) > $5 OR ((%1$s) = $5 AND e.id::text > $6)', v_distance) END);

    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', greatest(p_ef_search, 1)::text, true);
    END IF;
    -- A very selective filter: scanning its few matching rows exactly is both faster and exact.
    IF NOT p_exact AND (v_filter IS NOT NULL OR p_condition IS NOT NULL) THEN
        EXECUTE format('SELECT count(*) <= $7 FROM (SELECT 1 FROM %s s WHERE (%s) AND (%s) LIMIT $7 + 1) x',
                       p_watch.tbl, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'))
           INTO p_exact
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id, imgembed._exact_scan_rows();
    END IF;
    IF NOT p_exact THEN
        EXECUTE format(v_template, v_distance)
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_exact OR ((v_filter IS NOT NULL OR p_condition IS NOT NULL) AND coalesce(cardinality(v_ids), 0) < p_k) THEN
        -- "+ 0" keeps the planner off the index: an exact scan in (distance, key) order.
        EXECUTE format(v_template, format('(%s) + 0, e.id::text', v_distance))
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_ef_search IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', coalesce(v_previous_ef, '40'), true);
    END IF;
    RETURN QUERY SELECT u.id, u.d FROM unnest(v_ids, v_distances) WITH ORDINALITY AS u(id, d, n) ORDER BY u.n;
END $$;

CREATE OR REPLACE FUNCTION imgembed.near_duplicates(
    tbl regclass,
    max_distance double precision DEFAULT 0.02,
    model text DEFAULT NULL,
    per_item integer DEFAULT 10
) RETURNS TABLE (a text, b text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT p.a::text, p.b::text, p.d FROM ('
        ' SELECT DISTINCT ON (least(e.id, n.id), greatest(e.id, n.id))'
        '        least(e.id, n.id) AS a, greatest(e.id, n.id) AS b, n.d'
        '   FROM imgembed.%1$I e'
        '   CROSS JOIN LATERAL (SELECT f.id, (f.embedding OPERATOR(@vector@.<=>) e.embedding)::float8 AS d FROM imgembed.%1$I f'
        '                        WHERE f.id <> e.id ORDER BY f.embedding OPERATOR(@vector@.<=>) e.embedding LIMIT $2) n'
        '  WHERE n.d <= $1 ORDER BY least(e.id, n.id), greatest(e.id, n.id)) p'
        ' ORDER BY p.d, p.a, p.b',
        v_link.storage_table)
    USING max_distance, per_item;
END $$;

CREATE OR REPLACE FUNCTION imgembed.claim_batch(p_batch_size integer, p_lease_seconds double precision)
RETURNS TABLE (claim_id uuid, model_name text, job_ids bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_claim uuid := gen_random_uuid();
    v_model_id integer;
BEGIN
    SELECT j.model_id INTO v_model_id
      FROM imgembed.job j
     WHERE j.status = 'pending' AND j.not_before <= now()
     ORDER BY j.id
     LIMIT 1
     FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT j.id FROM imgembed.job j
         WHERE j.status = 'pending' AND j.not_before <= now() AND j.model_id = v_model_id
         ORDER BY j.id
         LIMIT p_batch_size
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE imgembed.job j
           SET status = 'in_flight', claim_id = v_claim, attempts = j.attempts + 1,
               lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
          FROM picked WHERE j.id = picked.id
        RETURNING j.id
    )
    SELECT v_claim, m.name, array_agg(c.id ORDER BY c.id)
      FROM claimed c CROSS JOIN imgembed.model m
     WHERE m.id = v_model_id
     GROUP BY m.name;
END $$;

CREATE OR REPLACE FUNCTION imgembed.start_claim(p_claim uuid, p_lease_seconds double precision)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE imgembed.job
       SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight'
    RETURNING id
$$;

CREATE OR REPLACE FUNCTION imgembed.release_claim(p_claim uuid)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_released integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.claim_id = p_claim AND j.status = 'in_flight'
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', claim_id = NULL, lease_until = NULL, attempts = greatest(attempts - 1, 0),
           updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    RETURN v_released;
END $$;

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
