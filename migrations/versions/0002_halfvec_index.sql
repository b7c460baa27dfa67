-- Revision 0002, upgrade: frozen as released (the SQL imgembed ran at commit 966a211).
-- A released revision never changes: later changes go into a new revision, and functions
-- and views into sql/, which every upgrade to the newest revision applies again.

-- Attaching imgembed to tables: watch(), unwatch(), add_model().

-- The HNSW index of one vector table. It indexes half-precision copies of the vectors (half the
-- size and faster to compare, same recall at CLIP dimensions, up to 4,000 dimensions); searches
-- re-rank its candidates with the full-precision vectors (see imgembed._knn).
CREATE OR REPLACE FUNCTION imgembed._create_index(
    p_storage text,
    p_dim integer,
    p_m integer DEFAULT 16,
    p_ef_construction integer DEFAULT 64
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_dim > 4000 THEN
        RAISE NOTICE 'no HNSW index on imgembed.%: pgvector indexes at most 4,000 dimensions; searches scan exactly',
            p_storage;
        RETURN;
    END IF;
    EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw ((embedding::@vector@.halfvec(%s)) @vector@.halfvec_cosine_ops) '
                   'WITH (m = %s, ef_construction = %s)',
                   p_storage || '_hnsw', p_storage, p_dim, p_m, p_ef_construction);
END $$;

-- Create the vector table of (watch, model), its HNSW index, and enqueue every existing row.
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
    -- Vectors of up to 1,536 dimensions (6 KB) stay in the row instead of going to TOAST: exact
    -- scans and re-ranking then read one page per row, not three (ten times faster at 512 dims).
    IF p_model.dim <= 1536 THEN
        EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE PLAIN', v_storage);
    END IF;
    PERFORM imgembed._create_index(v_storage, p_model.dim);
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

-- Start embedding a watched table with one more model (backfills every row).
CREATE OR REPLACE FUNCTION imgembed.add_model(p_tbl regclass, p_model text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM imgembed._attach_model(imgembed._watch_of(p_tbl), imgembed._model_named(p_model), false);
END $$;

-- Build a watched table's HNSW index again with other settings (pgvector's m and
-- ef_construction: larger is slower to build, bigger, and finds more true neighbours). Writes of
-- new vectors for that table and model wait while it builds; raise maintenance_work_mem first.
CREATE OR REPLACE FUNCTION imgembed.rebuild_index(
    tbl regclass,
    model text DEFAULT NULL,
    m integer DEFAULT 16,
    ef_construction integer DEFAULT 64
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_link.storage_table || '_hnsw');
    PERFORM imgembed._create_index(v_link.storage_table, registered.dim, m, ef_construction)
       FROM imgembed.model registered WHERE registered.id = v_link.model_id;
END $$;

-- Attach to a table with explicit input columns: image bytes (bytea) and/or image location (text);
-- or, for imgembed's own text tables, text to embed with the text tower.
CREATE OR REPLACE FUNCTION imgembed._watch(
    p_tbl regclass,
    p_content_column text,
    p_uri_column text,
    p_label_column text DEFAULT NULL,
    p_model text DEFAULT NULL,
    p_text_column text DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_relkind "char";
    v_key_column text;
    v_key_type text;
    v_key_count integer;
    v_watch imgembed.watch;
    v_model imgembed.model;
    v_column text;
    v_type text;
BEGIN
    SELECT relkind INTO v_relkind FROM pg_class WHERE oid = p_tbl;
    IF v_relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table (imgembed watches ordinary and partitioned tables)', p_tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF p_tbl::oid IN (SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'imgembed'::regnamespace)
       AND p_tbl NOT IN ('imgembed.image'::regclass, 'imgembed.text_query'::regclass, 'imgembed.label_prompt'::regclass) THEN
        RAISE EXCEPTION 'imgembed''s own table % cannot be watched', p_tbl USING ERRCODE = 'wrong_object_type';
    END IF;

    SELECT count(*), min(a.attname), min(format_type(a.atttypid, NULL))
      INTO v_key_count, v_key_column, v_key_type
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = p_tbl AND i.indisprimary;
    IF v_key_count = 0 THEN
        RAISE EXCEPTION 'table % has no primary key', p_tbl
            USING HINT = 'imgembed needs a single-column primary key of type bigint, integer, uuid or text',
                  ERRCODE = 'invalid_table_definition';
    ELSIF v_key_count > 1 THEN
        RAISE EXCEPTION 'table % has a composite primary key', p_tbl
            USING HINT = 'imgembed needs a single-column primary key of type bigint, integer, uuid or text',
                  ERRCODE = 'invalid_table_definition';
    ELSIF v_key_type NOT IN ('bigint', 'integer', 'smallint', 'uuid', 'text', 'character varying') THEN
        RAISE EXCEPTION 'primary key %.% has type %, which imgembed does not support', p_tbl, v_key_column, v_key_type
            USING HINT = 'supported key types: bigint, integer, smallint, uuid, text, varchar',
                  ERRCODE = 'datatype_mismatch';
    END IF;

    FOREACH v_column IN ARRAY ARRAY[p_content_column, p_uri_column, p_text_column, p_label_column] LOOP
        CONTINUE WHEN v_column IS NULL;
        SELECT format_type(atttypid, NULL) INTO v_type
          FROM pg_attribute WHERE attrelid = p_tbl AND attname = v_column AND attnum > 0 AND NOT attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" does not exist in table %', v_column, p_tbl
                USING ERRCODE = 'undefined_column';
        END IF;
        IF v_column IS NOT DISTINCT FROM p_content_column AND v_type <> 'bytea' THEN
            RAISE EXCEPTION 'column "%" of % has type %, expected bytea', v_column, p_tbl, v_type
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF v_column IN (p_uri_column, p_text_column) AND v_type NOT IN ('text', 'character varying') THEN
            RAISE EXCEPTION 'column "%" of % has type %, expected text (a path or URI)', v_column, p_tbl, v_type
                USING ERRCODE = 'datatype_mismatch';
        END IF;
    END LOOP;

    SELECT * INTO v_watch FROM imgembed.watch WHERE tbl = p_tbl;
    IF FOUND THEN
        IF v_watch.content_column IS DISTINCT FROM p_content_column
           OR v_watch.uri_column IS DISTINCT FROM p_uri_column THEN
            RAISE EXCEPTION 'table % is already watched with another image column', p_tbl
                USING HINT = 'call imgembed.unwatch() first', ERRCODE = 'duplicate_object';
        END IF;
        RETURN v_watch.id;
    END IF;

    INSERT INTO imgembed.watch (tbl, table_name, key_column, key_type, content_column, uri_column, text_column,
                                label_column)
    VALUES (p_tbl,
            (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = p_tbl),
            v_key_column,
            CASE v_key_type WHEN 'character varying' THEN 'text' ELSE v_key_type END,
            p_content_column, p_uri_column, p_text_column, p_label_column)
    RETURNING * INTO v_watch;

    EXECUTE format('CREATE TRIGGER imgembed_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS imgembed_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_insert(%s)', p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'NEW TABLE AS imgembed_new FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_update(%s)',
                   p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_delete(%s)', p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_truncate(%s)', p_tbl, v_watch.id);

    IF p_model IS NULL THEN
        SELECT * INTO v_model FROM imgembed.model WHERE is_default;
        IF NOT FOUND THEN
            RAISE NOTICE 'imgembed: no model is registered yet; rows of % will be embedded once one is', p_tbl;
            RETURN v_watch.id;
        END IF;
    ELSE
        v_model := imgembed._model_named(p_model);
    END IF;
    PERFORM imgembed._attach_model(v_watch, v_model, true);
    RETURN v_watch.id;
END $$;

-- Watch a table: every row's image (bytea bytes, or text path / file:// / http(s):// URI) gets an
-- embedding; existing rows are backfilled. Returns the watch id. Calling it again is a no-op.
CREATE OR REPLACE FUNCTION imgembed.watch(
    tbl regclass,
    image_column text,
    label_column text DEFAULT NULL,
    model text DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_type text;
BEGIN
    SELECT format_type(atttypid, NULL) INTO v_type
      FROM pg_attribute WHERE attrelid = tbl AND attname = image_column AND attnum > 0 AND NOT attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" does not exist in table %', image_column, tbl
            USING ERRCODE = 'undefined_column';
    ELSIF v_type = 'bytea' THEN
        RETURN imgembed._watch(tbl, image_column, NULL, label_column, model);
    ELSIF v_type IN ('text', 'character varying') THEN
        RETURN imgembed._watch(tbl, NULL, image_column, label_column, model);
    END IF;
    RAISE EXCEPTION 'column "%" of % has type %: an image column must be bytea (the bytes) or text (a path or URI)',
        image_column, tbl, v_type USING ERRCODE = 'datatype_mismatch';
END $$;

-- Stop watching a table: drop its triggers, its vectors and its jobs. The table itself is untouched.
CREATE OR REPLACE FUNCTION imgembed.unwatch(tbl regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_storage text;
    v_trigger text;
BEGIN
    FOREACH v_trigger IN ARRAY ARRAY['imgembed_insert', 'imgembed_update', 'imgembed_delete', 'imgembed_truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_trigger, tbl);
    END LOOP;
    FOR v_storage IN SELECT storage_table FROM imgembed.watch_model WHERE watch_id = v_watch.id LOOP
        EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_storage);
    END LOOP;
    PERFORM imgembed._delete_jobs(v_watch.id);
    DELETE FROM imgembed.watch WHERE id = v_watch.id;
END $$;

-- The job queue: claimed by dispatchers, leased to workers, finished in one transaction with the
-- vectors it produced. A claim id ties a batch to the one task that may finish it, so a stale
-- Celery message (redelivered after its lease expired) can never write or complete anything.

-- Turn up to p_max_rows intake rows into jobs: one per (key, model attached to the table), at
-- most one pending per row and model. Returns the number of intake rows expanded.
CREATE OR REPLACE FUNCTION imgembed.expand_intake(p_max_rows integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_intake imgembed.intake;
    v_expanded integer := 0;
BEGIN
    FOR v_intake IN
        SELECT * FROM imgembed.intake ORDER BY id LIMIT p_max_rows FOR UPDATE SKIP LOCKED
    LOOP
        INSERT INTO imgembed.job (watch_id, model_id, key, enqueued_at)
        SELECT v_intake.watch_id, wm.model_id, k.key, v_intake.created_at
          FROM unnest(v_intake.keys) AS k(key)
          JOIN imgembed.watch_model wm
            ON wm.watch_id = v_intake.watch_id AND (v_intake.model_id IS NULL OR wm.model_id = v_intake.model_id)
        ON CONFLICT (watch_id, model_id, key) WHERE status = 'pending' DO NOTHING;
        DELETE FROM imgembed.intake WHERE id = v_intake.id;
        v_expanded := v_expanded + 1;
    END LOOP;
    RETURN v_expanded;
END $$;

-- Claim up to p_batch_size pending jobs of one model (the model of the oldest pending job).
-- Returns nothing when no job is ready. The attempt is counted when a worker starts the claim, so
-- a claim that waited in the broker past its lease costs its jobs no attempt.
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
           SET status = 'in_flight', claim_id = v_claim,
               lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
          FROM picked WHERE j.id = picked.id
        RETURNING j.id
    )
    SELECT v_claim, m.name, array_agg(c.id ORDER BY c.id)
      FROM claimed c CROSS JOIN imgembed.model m
     WHERE m.id = v_model_id
     GROUP BY m.name;
END $$;

-- Jobs in flight now (the dispatcher's back-pressure).
CREATE OR REPLACE FUNCTION imgembed.in_flight_count()
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM imgembed.job WHERE status = 'in_flight'
$$;

-- A worker starts on a claim: extend the lease, count an attempt, return the jobs it still owns.
CREATE OR REPLACE FUNCTION imgembed.start_claim(p_claim uuid, p_lease_seconds double precision)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE imgembed.job
       SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now(),
           attempts = attempts + 1
     WHERE claim_id = p_claim AND status = 'in_flight'
    RETURNING id
$$;

-- Hand a claim back untouched (the dispatcher could not send its task): no attempt is counted.
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
       SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    RETURN v_released;
END $$;

-- Jobs whose lease ran out (their worker died or hung) go back to pending, or fail after
-- p_max_attempts. A job superseded by a newer pending one for the same row is dropped.
CREATE OR REPLACE FUNCTION imgembed.recover_expired(p_max_attempts integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_recovered integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.status = 'in_flight' AND j.lease_until < now()
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    WITH expired AS (
        SELECT id FROM imgembed.job
         WHERE status = 'in_flight' AND lease_until < now()
         FOR UPDATE SKIP LOCKED
    )
    UPDATE imgembed.job j
       SET status = CASE WHEN j.attempts >= p_max_attempts THEN 'failed' ELSE 'pending' END,
           last_error = CASE WHEN j.attempts = 0
               THEN 'lease expired before a worker started the claim (queued too long: raise IMGEMBED_LEASE_SECONDS '
                    'or lower IMGEMBED_MAX_IN_FLIGHT)'
               ELSE format('worker lost: lease expired (attempt %s of %s)', j.attempts, p_max_attempts) END,
           claim_id = NULL, lease_until = NULL, updated_at = now()
      FROM expired WHERE j.id = expired.id;
    GET DIAGNOSTICS v_recovered = ROW_COUNT;
    RETURN v_recovered;
END $$;

-- What a claim's jobs embed (image bytes, image location or text), read from the watched tables.
-- A job whose row is gone is absent.
CREATE OR REPLACE FUNCTION imgembed.claimed_images(p_claim uuid)
RETURNS TABLE (job_id bigint, key text, content bytea, uri text, body text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN
        SELECT w.* FROM imgembed.watch w
         WHERE w.id IN (SELECT j.watch_id FROM imgembed.job j WHERE j.claim_id = p_claim)
    LOOP
        RETURN QUERY EXECUTE format(
            'SELECT j.id, j.key, %s, %s, %s FROM imgembed.job j JOIN %s s ON s.%I = j.key::%s '
            'WHERE j.claim_id = $1 AND j.watch_id = $2 AND j.status = ''in_flight''',
            CASE WHEN v_watch.content_column IS NULL THEN 'NULL::bytea'
                 ELSE format('s.%I', v_watch.content_column) END,
            CASE WHEN v_watch.uri_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.uri_column) END,
            CASE WHEN v_watch.text_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.text_column) END,
            v_watch.tbl, v_watch.key_column, v_watch.key_type)
        USING p_claim, v_watch.id;
    END LOOP;
END $$;

-- Finish a claim in one transaction: write the vectors of p_done_ids (a NULL vector means the row
-- is gone: nothing to write), complete those jobs, and record p_failed_ids with their errors
-- (retried with exponential backoff when p_retryable and attempts remain, else failed).
-- Only jobs this claim still owns are touched. Returns the number of vectors written.
CREATE OR REPLACE FUNCTION imgembed.finish_batch(
    p_claim uuid,
    p_done_ids bigint[],
    p_vectors @vector@.vector[],
    p_failed_ids bigint[],
    p_errors text[],
    p_retryable boolean[],
    p_max_attempts integer,
    p_backoff_seconds double precision
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_owned bigint[];
    v_written integer := 0;
    v_count integer;
    v_target record;
BEGIN
    -- Lock what we own. A job locked by someone else is being deleted with its row (or recovered):
    -- skip it rather than wait, so a writer deleting rows never deadlocks with us.
    SELECT coalesce(array_agg(id), '{}') INTO v_owned
      FROM (SELECT id FROM imgembed.job
             WHERE claim_id = p_claim AND status = 'in_flight'
             ORDER BY id FOR UPDATE SKIP LOCKED) owned;

    FOR v_target IN
        SELECT w.tbl, w.key_column, w.key_type, w.id AS watch_id, wm.storage_table
          FROM imgembed.watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
         WHERE (w.id, wm.model_id) IN (SELECT j.watch_id, j.model_id FROM imgembed.job j WHERE j.id = ANY (v_owned))
    LOOP
        EXECUTE format($f$
            INSERT INTO imgembed.%1$I AS e (id, embedding, job_id)
            SELECT s.%3$I, v.vec, j.id
              FROM unnest($1::bigint[], $2::@vector@.vector[]) AS v(job_id, vec)
              JOIN imgembed.job j ON j.id = v.job_id
              JOIN %2$s s ON s.%3$I = j.key::%4$s
             WHERE v.vec IS NOT NULL AND j.id = ANY ($3) AND j.watch_id = $4
            ON CONFLICT (id) DO UPDATE
               SET embedding = excluded.embedding, job_id = excluded.job_id, embedded_at = now()
             WHERE e.job_id < excluded.job_id$f$,
            v_target.storage_table, v_target.tbl, v_target.key_column, v_target.key_type)
        USING p_done_ids, p_vectors, v_owned, v_target.watch_id;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_written := v_written + v_count;
    END LOOP;

    -- A success makes older failures of the same row and model moot.
    DELETE FROM imgembed.job f
     USING imgembed.job d
     WHERE d.id = ANY (v_owned) AND d.id = ANY (p_done_ids)
       AND f.status = 'failed' AND f.watch_id = d.watch_id AND f.model_id = d.model_id AND f.key = d.key;
    DELETE FROM imgembed.job WHERE id = ANY (v_owned) AND id = ANY (p_done_ids);
    -- Room in flight again: wake a dispatcher to refill the broker's queue.
    PERFORM imgembed._notify_jobs(cardinality(v_owned));

    -- Failures superseded by a newer pending job (the image changed meanwhile) are dropped.
    DELETE FROM imgembed.job j
     WHERE j.id = ANY (v_owned) AND j.id = ANY (p_failed_ids)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job j
       SET status = CASE WHEN f.retryable AND j.attempts < p_max_attempts THEN 'pending' ELSE 'failed' END,
           last_error = f.error,
           not_before = now() + make_interval(secs => p_backoff_seconds * power(2, greatest(j.attempts - 1, 0))),
           claim_id = NULL, lease_until = NULL, updated_at = now()
      FROM unnest(p_failed_ids, p_errors, p_retryable) AS f(job_id, error, retryable)
     WHERE j.id = f.job_id AND j.id = ANY (v_owned);
    RETURN v_written;
END $$;

-- Put failed jobs back in the queue (all, one table's, and/or those whose error contains
-- `reason`), with fresh attempts. Returns how many.
CREATE OR REPLACE FUNCTION imgembed.retry_failed(p_tbl regclass DEFAULT NULL, p_reason text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_watch_id integer := CASE WHEN p_tbl IS NULL THEN NULL ELSE (imgembed._watch_of(p_tbl)).id END;
    v_count integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.status = 'failed'
       AND (v_watch_id IS NULL OR j.watch_id = v_watch_id)
       AND (p_reason IS NULL OR strpos(j.last_error, p_reason) > 0)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', attempts = 0, not_before = now(), updated_at = now()
     WHERE status = 'failed' AND (v_watch_id IS NULL OR watch_id = v_watch_id)
       AND (p_reason IS NULL OR strpos(last_error, p_reason) > 0);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_count);
    RETURN v_count;
END $$;

-- Nearest-neighbour search over a watched table's vectors: the shared core and similar().
-- Filters are a jsonb object of column: value (or [values], or null) checked against the source
-- table's columns and bound as a parameter: no user text is ever spliced into SQL.

-- SQL condition over the source row (alias s) for a jsonb filter, reading values from $p_param.
CREATE OR REPLACE FUNCTION imgembed._filter_sql(p_watch imgembed.watch, p_filter jsonb, p_param integer)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_column text;
    v_value jsonb;
    v_type text;
    v_parts text[] := '{}';
BEGIN
    IF p_filter IS NULL OR p_filter = '{}'::jsonb THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_filter) <> 'object' THEN
        RAISE EXCEPTION 'filter must be a JSON object of column: value pairs, not a JSON %', jsonb_typeof(p_filter)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_column, v_value IN SELECT * FROM jsonb_each(p_filter) LOOP
        SELECT format_type(atttypid, atttypmod) INTO v_type
          FROM pg_attribute WHERE attrelid = p_watch.tbl AND attname = v_column AND attnum > 0 AND NOT attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'filter column "%" does not exist in table %', v_column, p_watch.table_name
                USING ERRCODE = 'undefined_column';
        END IF;
        v_parts := v_parts || CASE jsonb_typeof(v_value)
            WHEN 'null' THEN format('s.%I IS NULL', v_column)
            WHEN 'array' THEN format('s.%I = ANY (ARRAY(SELECT jsonb_array_elements_text($%s -> %L))::%s[])',
                                     v_column, p_param, v_column, v_type)
            WHEN 'object' THEN NULL
            ELSE format('s.%I = ($%s ->> %L)::%s', v_column, p_param, v_column, v_type) END;
        IF v_parts[cardinality(v_parts)] IS NULL THEN
            RAISE EXCEPTION 'filter value for "%" must be a scalar, an array or null', v_column
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    RETURN array_to_string(v_parts, ' AND ');
END $$;

-- The stored vector of one row, or a clear error while it has none.
CREATE OR REPLACE FUNCTION imgembed._stored_vector(p_watch imgembed.watch, p_link imgembed.watch_model, p_key text)
RETURNS @vector@.vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_vector @vector@.vector;
BEGIN
    EXECUTE format('SELECT embedding FROM imgembed.%I WHERE id = $1::%s', p_link.storage_table, p_watch.key_type)
       INTO v_vector USING p_key;
    RETURN v_vector;
END $$;

CREATE OR REPLACE FUNCTION imgembed._require_vector(p_watch imgembed.watch, p_link imgembed.watch_model, p_key text)
RETURNS @vector@.vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_vector @vector@.vector := imgembed._stored_vector(p_watch, p_link, p_key);
BEGIN
    IF v_vector IS NULL THEN
        RAISE EXCEPTION 'row % of % has no vector yet (pending, failed, or no such row)', p_key, p_watch.table_name
            USING HINT = 'see imgembed.status and imgembed.failures', ERRCODE = 'no_data_found';
    END IF;
    RETURN v_vector;
END $$;

-- Filtered searches whose filter matches at most this many rows scan those rows exactly
-- (setting imgembed.exact_scan_rows, default 5000).
CREATE OR REPLACE FUNCTION imgembed._exact_scan_rows()
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('imgembed.exact_scan_rows', true), '')::integer, 5000)
$$;

-- The HNSW candidate list of searches that name no ef_search (setting imgembed.ef_search,
-- default 100: pgvector's own default of 40 misses more of the true neighbours in clustered data
-- for about the same time; see bench/RESULTS.md).
CREATE OR REPLACE FUNCTION imgembed._ef_search()
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('imgembed.ef_search', true), '')::integer, 100)
$$;

-- The k nearest rows to p_query, nearest first, as (text key, cosine distance).
-- A filter matching few rows (imgembed.exact_scan_rows) is answered by an exact scan of them;
-- otherwise the HNSW index (half precision) with pgvector's iterative scan (strict order) finds
-- 2k candidates, re-ranked by their full-precision distance; if a filtered search still finds
-- fewer than k rows, the exact scan answers instead. Distances are always full precision.
-- Keyset pagination: rows after (p_after_distance, p_after_id) in (distance, key) order.
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
    p_exact := p_exact OR v_dim > 4000;  -- no index above 4,000 dimensions (see _create_index)
    -- The first %%s below is the ORDER BY, the second the LIMIT; both are filled per path.
    v_template := format(
        'SELECT (array_agg(q.id ORDER BY q.d, q.id))[1:$2], (array_agg(q.d ORDER BY q.d, q.id))[1:$2] FROM ('
        ' SELECT e.id::text AS id, (e.embedding OPERATOR(@vector@.<=>) $1)::float8 AS d FROM imgembed.%1$I e %2$s'
        ' WHERE e.id::text <> ALL ($3) AND (%3$s) AND (%4$s) AND (%5$s) ORDER BY %%s LIMIT %%s) q',
        p_link.storage_table,
        CASE WHEN v_filter IS NULL AND p_condition IS NULL THEN ''
             ELSE format('JOIN %s s ON s.%I = e.id', p_watch.tbl, p_watch.key_column) END,
        coalesce(v_filter, 'true'),
        coalesce(p_condition, 'true'),
        CASE WHEN p_after_distance IS NULL THEN 'true'
             ELSE '(e.embedding OPERATOR(@vector@.<=>) $1) > $5 OR ((e.embedding OPERATOR(@vector@.<=>) $1) = $5 AND e.id::text > $6)' END);

    PERFORM set_config('hnsw.ef_search', greatest(coalesce(p_ef_search, imgembed._ef_search()), 1)::text, true);
    -- A very selective filter: scanning its few matching rows exactly is both faster and exact.
    IF NOT p_exact AND (v_filter IS NOT NULL OR p_condition IS NOT NULL) THEN
        EXECUTE format('SELECT count(*) <= $7 FROM (SELECT 1 FROM %s s WHERE (%s) AND (%s) LIMIT $7 + 1) x',
                       p_watch.tbl, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'))
           INTO p_exact
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id, imgembed._exact_scan_rows();
    END IF;
    IF NOT p_exact THEN
        -- The same expression as the index, so the planner walks it.
        EXECUTE format(v_template, format('e.embedding::@vector@.halfvec(%1$s) OPERATOR(@vector@.<=>) $1::@vector@.halfvec(%1$s)', v_dim), '$2 * 2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_exact OR ((v_filter IS NOT NULL OR p_condition IS NOT NULL) AND coalesce(cardinality(v_ids), 0) < p_k) THEN
        -- "+ 0" keeps the planner off the index: an exact scan in (distance, key) order.
        EXECUTE format(v_template, '(e.embedding OPERATOR(@vector@.<=>) $1) + 0, e.id::text', '$2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    PERFORM set_config('hnsw.ef_search', coalesce(v_previous_ef, '40'), true);
    RETURN QUERY SELECT u.id, u.d FROM unnest(v_ids, v_distances) WITH ORDINALITY AS u(id, d, n) ORDER BY u.n;
END $$;

-- The k images most similar to one row (itself excluded), nearest first. Keys keep their type.
CREATE OR REPLACE FUNCTION imgembed.similar(
    tbl regclass,
    key anyelement,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anyelement DEFAULT NULL
) RETURNS TABLE (id anyelement, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed._knn($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9, $10) r',
        pg_typeof(key))
    USING v_watch, v_link, imgembed._require_vector(v_watch, v_link, key::text), k, ARRAY[key::text],
          filter, exact, ef_search, after_distance, after_id::text;
END $$;

-- The k rows nearest to any vector of the model's dimension. Keys come back as text; the
-- overload with a key_type argument (e.g. NULL::bigint) returns them in that type.
CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, imgembed._watch_model_of(v_watch, model), vec, k, '{}', filter, NULL, exact, ef_search,
        after_distance, after_id) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    key_type anyelement,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id anyelement, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.similar_to_vector($1, $2, $3, $4, $5, $6, $7, $8, $9) r',
        pg_typeof(key_type))
    USING tbl, vec, k, model, filter, ef_search, exact, after_distance, after_id;
END $$;

-- Pairs of rows whose images are near-identical (cosine distance <= max_distance), each pair once.
-- Each row's per_item nearest neighbours are examined (HNSW), so a group larger than per_item
-- identical images yields only part of its pairs: raise per_item for such data.
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
        '                        WHERE f.id <> e.id'
        '                        ORDER BY f.embedding::@vector@.halfvec(%2$s) OPERATOR(@vector@.<=>) e.embedding::@vector@.halfvec(%2$s) LIMIT $2) n'
        '  WHERE n.d <= $1 ORDER BY least(e.id, n.id), greatest(e.id, n.id)) p'
        ' ORDER BY p.d, p.a, p.b',
        v_link.storage_table, (SELECT dim FROM imgembed.model WHERE model.id = v_link.model_id))
    USING max_distance, per_item;
END $$;

-- Revision 0002, upgrade: vector tables of databases made before it get the half-precision HNSW
-- index and, up to 1,536 dimensions, vectors stored in the row (imgembed._attach_model does both
-- for new tables). VACUUM FULL cannot run inside the migration's transaction, so every row is
-- rewritten with a fresh copy of its vector, which PLAIN storage then keeps in the row.
DO $$
DECLARE
    v_table record;
BEGIN
    FOR v_table IN
        SELECT wm.storage_table, m.dim FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
    LOOP
        IF v_table.dim <= 1536 THEN
            EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE PLAIN', v_table.storage_table);
        END IF;
        EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_table.storage_table || '_hnsw');
        IF v_table.dim <= 1536 THEN
            EXECUTE format('UPDATE imgembed.%I SET embedding = embedding::real[]::@vector@.vector', v_table.storage_table);
        END IF;
        PERFORM imgembed._create_index(v_table.storage_table, v_table.dim);
    END LOOP;
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
