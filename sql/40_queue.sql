-- The job queue: claimed by dispatchers, leased to workers, finished in one transaction with the
-- vectors it produced. A claim id ties a batch to the one task that may finish it, so a stale
-- Celery message (redelivered after its lease expired) can never write or complete anything.

-- Turn up to p_max_rows intake rows into jobs: one per (key, model attached to the table, except
-- reduced models), at most one pending per row and model. Returns the number of intake rows expanded.
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
          JOIN imgembed.model m ON m.id = wm.model_id AND m.derived_from IS NULL  -- reduced models: projected
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

-- What a claim's jobs embed (image bytes, image location or text), read from the watched tables,
-- with the table's name. A job whose row is gone is absent. A table imgembed's owner may not read
-- now (its SELECT was revoked, or row-level security was turned on for it since watch()) costs its
-- jobs latency, never their rows: they wait a minute, with the reason, and no attempt is spent.
CREATE OR REPLACE FUNCTION imgembed.claimed_images(p_claim uuid)
RETURNS TABLE (job_id bigint, key text, content bytea, uri text, body text, table_name text)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN
        SELECT w.* FROM imgembed._live_watch w
         WHERE w.id IN (SELECT j.watch_id FROM imgembed.job j WHERE j.claim_id = p_claim)
    LOOP
      BEGIN
        RETURN QUERY EXECUTE format(
            'SELECT j.id, j.key, %s, %s, %s, $3 FROM imgembed.job j JOIN %s s ON s.%I = j.key::%s '
            'WHERE j.claim_id = $1 AND j.watch_id = $2 AND j.status = ''in_flight''',
            CASE WHEN v_watch.content_column IS NULL THEN 'NULL::bytea'
                 ELSE format('s.%I', v_watch.content_column) END,
            CASE WHEN v_watch.uri_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.uri_column) END,
            CASE WHEN v_watch.text_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.text_column) END,
            v_watch.tbl, v_watch.key_column, v_watch.key_type)
        USING p_claim, v_watch.id, v_watch.table_name;
      EXCEPTION WHEN insufficient_privilege THEN
        PERFORM imgembed.requeue_claim(
            p_claim,
            ARRAY(SELECT j.id FROM imgembed.job j WHERE j.claim_id = p_claim AND j.watch_id = v_watch.id),
            format('imgembed''s owner cannot read %s (%s); waiting', v_watch.table_name, SQLERRM), 60);
      END;
    END LOOP;
END $$;

-- Finish a claim in one transaction: write the vectors of p_done_ids (a NULL vector means the row
-- is gone: nothing to write), complete those jobs, and record p_failed_ids with their errors
-- (retried with exponential backoff when p_retryable and attempts remain, else failed).
-- Only jobs this claim still owns are touched. Returns the number of vectors written.
-- p_hashes: the SHA-256 of the image bytes each vector was made from (NULL for texts), kept beside
-- it so that the same bytes are not embedded again (vectors_by_content). The table's reduced
-- models get the projections of the vectors written.
CREATE OR REPLACE FUNCTION imgembed.finish_batch(
    p_claim uuid,
    p_done_ids bigint[],
    p_vectors @vector@.vector[],
    p_failed_ids bigint[],
    p_errors text[],
    p_retryable boolean[],
    p_max_attempts integer,
    p_backoff_seconds double precision,
    p_hashes bytea[] DEFAULT NULL
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
        SELECT ROW(w.*)::imgembed.watch AS watch, wm AS link, w.tbl, w.key_column, w.key_type, w.id AS watch_id, wm.storage_table
          FROM imgembed._live_watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
         WHERE (w.id, wm.model_id) IN (SELECT j.watch_id, j.model_id FROM imgembed.job j WHERE j.id = ANY (v_owned))
    LOOP
        EXECUTE format($f$
            INSERT INTO imgembed.%1$I AS e (id, embedding, job_id, content_sha256)
            SELECT s.%3$I, v.vec, j.id, v.sha
              FROM unnest($1::bigint[], $2::@vector@.vector[],
                          coalesce($5, array_fill(NULL::bytea, ARRAY[cardinality($1)]))) AS v(job_id, vec, sha)
              JOIN imgembed.job j ON j.id = v.job_id
              JOIN %2$s s ON s.%3$I = j.key::%4$s
             WHERE v.vec IS NOT NULL AND j.id = ANY ($3) AND j.watch_id = $4
            ON CONFLICT (id) DO UPDATE
               SET embedding = excluded.embedding, job_id = excluded.job_id, embedded_at = now(),
                   content_sha256 = excluded.content_sha256
             WHERE e.job_id < excluded.job_id$f$,
            v_target.storage_table, v_target.tbl, v_target.key_column, v_target.key_type)
        USING p_done_ids, p_vectors, v_owned, v_target.watch_id, p_hashes;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_written := v_written + v_count;
        -- The table's reduced models of this model follow in the same transaction.
        PERFORM imgembed._project_written(v_target.watch, v_target.link, v_owned);
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

-- Vectors the model already made from these image bytes (by their SHA-256), in any table: a worker
-- writes them again instead of embedding the same bytes once more. One vector per hash.
CREATE OR REPLACE FUNCTION imgembed.vectors_by_content(p_model text, p_hashes bytea[])
RETURNS TABLE (content_sha256 bytea, embedding @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_storage text;
    v_found bytea[] := '{}';
    v_hashes bytea[];
    v_vectors @vector@.vector[];
BEGIN
    FOR v_storage IN
        SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
          JOIN imgembed.watch w ON w.id = wm.watch_id
         WHERE m.name = p_model AND w.text_column IS NULL ORDER BY wm.watch_id
    LOOP
        EXIT WHEN cardinality(v_found) >= cardinality(p_hashes);
        EXECUTE format(
            'SELECT coalesce(array_agg(x.h), ''{}''), coalesce(array_agg(x.v), ''{}'') FROM ('
            ' SELECT DISTINCT ON (e.content_sha256) e.content_sha256 AS h, e.embedding AS v FROM imgembed.%I e'
            '  WHERE e.content_sha256 = ANY ($1) AND e.content_sha256 <> ALL ($2)) x', v_storage)
           INTO v_hashes, v_vectors USING p_hashes, v_found;
        RETURN QUERY SELECT u.h, u.v FROM unnest(v_hashes, v_vectors) AS u(h, v);
        v_found := v_found || v_hashes;
    END LOOP;
END $$;

-- Hand jobs of a claim back without spending an attempt: what stopped them was not about their
-- rows (the model could not be loaded, the forward pass failed, the device ran out of memory).
-- They wait p_delay_seconds; the reason stays in last_error. Returns how many were handed back.
CREATE OR REPLACE FUNCTION imgembed.requeue_claim(
    p_claim uuid,
    p_job_ids bigint[],
    p_reason text,
    p_delay_seconds double precision
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    -- A row that changed meanwhile already has its pending job: this one goes.
    DELETE FROM imgembed.job j
     WHERE j.claim_id = p_claim AND j.status = 'in_flight' AND j.id = ANY (p_job_ids)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', attempts = greatest(attempts - 1, 0), last_error = p_reason,
           not_before = now() + make_interval(secs => greatest(coalesce(p_delay_seconds, 0), 0)),
           claim_id = NULL, lease_until = NULL, updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight' AND id = ANY (p_job_ids);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
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
