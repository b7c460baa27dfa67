-- What users look at: exact backlog per (table, model), failures, a row's stored vector.

-- Jobs per (watched table, model), in one pass over the queue: rows queued (jobs pending, and keys
-- the triggers wrote that are not jobs yet), in flight and failed, and when the oldest queued row
-- was queued. What status and backlog() count; each role counts the jobs it may see.
CREATE OR REPLACE FUNCTION imgembed._job_counts()
RETURNS TABLE (watch_id integer, model_id integer, queued bigint, in_flight bigint, failed bigint,
               oldest_queued timestamptz)
LANGUAGE sql STABLE AS $$
    WITH jobs AS (
        SELECT j.watch_id, j.model_id, count(*) FILTER (WHERE j.status = 'pending') AS pending,
               count(*) FILTER (WHERE j.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE j.status = 'failed') AS failed,
               min(j.enqueued_at) FILTER (WHERE j.status = 'pending') AS oldest
          FROM imgembed.job j GROUP BY j.watch_id, j.model_id),
    written AS (
        SELECT i.watch_id, wm.model_id, sum(cardinality(i.keys)) AS keys, min(i.created_at) AS oldest
          FROM imgembed.intake i
          JOIN imgembed.watch_model wm ON wm.watch_id = i.watch_id AND (i.model_id IS NULL OR i.model_id = wm.model_id)
         GROUP BY i.watch_id, wm.model_id)
    SELECT wm.watch_id, wm.model_id, (coalesce(j.pending, 0) + coalesce(k.keys, 0))::bigint, coalesce(j.in_flight, 0),
           coalesce(j.failed, 0), least(j.oldest, k.oldest)
      FROM imgembed.watch_model wm
      LEFT JOIN jobs j ON j.watch_id = wm.watch_id AND j.model_id = wm.model_id
      LEFT JOIN written k ON k.watch_id = wm.watch_id AND k.model_id = wm.model_id
$$;

CREATE OR REPLACE FUNCTION imgembed._status_rows()
RETURNS TABLE (
    table_name text,
    model text,
    is_default boolean,
    "rows" bigint,
    embedded bigint,
    pending bigint,
    in_flight bigint,
    failed bigint,
    oldest_pending_age interval,
    embedded_last_minute bigint,
    embedded_last_5_minutes bigint
)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link record;
BEGIN
    FOR v_link IN
        SELECT w.id AS watch_id, w.tbl, w.table_name, m.id AS model_id, m.name, wm.is_default, wm.storage_table,
               imgembed._has_image_sql(ROW(w.*)::imgembed.watch, 's') AS has_image,
               c.queued, c.in_flight, c.failed, now() - c.oldest_queued AS oldest_queued_age
          FROM imgembed._live_watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
          JOIN imgembed.model m ON m.id = wm.model_id
          JOIN imgembed._job_counts() c ON c.watch_id = wm.watch_id AND c.model_id = wm.model_id
         WHERE has_table_privilege(w.tbl, 'SELECT')  -- a role sees the tables it may read
         ORDER BY w.table_name, m.name
    LOOP
        table_name := v_link.table_name;
        model := v_link.name;
        is_default := v_link.is_default;
        EXECUTE format('SELECT count(*) FROM %s s WHERE %s', v_link.tbl, v_link.has_image) INTO "rows";
        EXECUTE format('SELECT count(*), count(*) FILTER (WHERE embedded_at > now() - interval ''1 minute''),'
                       ' count(*) FILTER (WHERE embedded_at > now() - interval ''5 minutes'') FROM imgembed.%I',
                       v_link.storage_table)
           INTO embedded, embedded_last_minute, embedded_last_5_minutes;
        pending := v_link.queued;  -- keys still in the intake (not yet jobs) are pending too
        in_flight := v_link.in_flight;
        failed := v_link.failed;
        oldest_pending_age := v_link.oldest_queued_age;
        RETURN NEXT;
    END LOOP;
END $$;

-- Per watched table and model: rows with an image, rows embedded, jobs pending / in flight /
-- failed, how long the oldest pending job has waited, and vectors written in the last 1 and 5
-- minutes (throughput). Counts are exact.
CREATE OR REPLACE VIEW imgembed.status AS
SELECT * FROM imgembed._status_rows();

-- The work waiting per (table, model), cheap enough to read every few seconds: rows queued (jobs
-- pending, and changed keys the triggers wrote that are not jobs yet), jobs in flight, and how long
-- the oldest queued row has waited (NULL: none). What autoscalers and the dispatcher's metrics
-- read; the workers' role may call it (docs/monitoring.md). Runs as its owner: counts only.
CREATE OR REPLACE FUNCTION imgembed.backlog()
RETURNS TABLE (table_name text, model text, queued bigint, in_flight bigint, oldest_queued_seconds double precision)
LANGUAGE sql STABLE AS $$
    SELECT w.table_name, m.name, c.queued, c.in_flight, extract(epoch FROM now() - c.oldest_queued)::float8
      FROM imgembed._live_watch w
      JOIN imgembed._job_counts() c ON c.watch_id = w.id
      JOIN imgembed.model m ON m.id = c.model_id
     ORDER BY 1, 2
$$;

-- Every failed job with its reason: of the rows the calling role may read.
CREATE OR REPLACE VIEW imgembed.failures WITH (security_barrier) AS
SELECT w.table_name, j.key, m.name AS model, j.attempts, j.last_error, j.updated_at AS failed_at
  FROM imgembed.job j
  JOIN imgembed._live_watch w ON w.id = j.watch_id
  JOIN imgembed.model m ON m.id = j.model_id
 WHERE j.status = 'failed' AND has_table_privilege(w.tbl, 'SELECT') AND imgembed._row_visible(w.id, j.key);

-- A row's stored vector (NULL while it is pending or when its image failed).
CREATE OR REPLACE FUNCTION imgembed.vector_of(tbl regclass, key anyelement, model text DEFAULT NULL)
RETURNS @vector@.vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN imgembed._stored_vector(v_watch, imgembed._watch_model_of(v_watch, model), key::text);
END $$;

-- Failures grouped by their reason (the error's text up to its first colon).
CREATE OR REPLACE VIEW imgembed.failure_reasons AS
SELECT f.table_name, f.model, split_part(f.last_error, ':', 1) AS reason, count(*) AS failures,
       max(f.failed_at) AS latest
  FROM imgembed.failures f
 GROUP BY 1, 2, 3;

-- Workers that reported in the last 30 seconds (they beat every 5 s while running).
-- `unavailable`: the models the worker cannot load now, as [{model, tower, reason, since}]; their
-- rows wait (they do not fail) until a worker loads them.
CREATE OR REPLACE VIEW imgembed.workers AS
SELECT h.worker, h.pid, h.device, h.models, h.batches, h.started_at, h.last_seen,
       h.last_seen > now() - interval '30 seconds' AS alive, h.unavailable
  FROM imgembed.worker_heartbeat h;

-- Models that live workers cannot load, one row per model and reason: what `imgembed status` shows.
CREATE OR REPLACE VIEW imgembed.unavailable_models AS
SELECT u->>'model' AS model, u->>'reason' AS reason, min((u->>'since')::timestamptz) AS since,
       array_agg(DISTINCT w.worker ORDER BY w.worker) AS workers
  FROM imgembed.workers w CROSS JOIN LATERAL jsonb_array_elements(w.unavailable) u
 WHERE w.alive
 GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION imgembed.worker_beat(
    p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint, p_unavailable jsonb
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO imgembed.worker_heartbeat AS h (worker, pid, device, models, batches, unavailable)
    VALUES (p_worker, p_pid, p_device, p_models, p_batches, coalesce(p_unavailable, '[]'))
    ON CONFLICT (worker) DO UPDATE
       SET pid = excluded.pid, device = excluded.device, models = excluded.models, batches = excluded.batches,
           unavailable = excluded.unavailable, last_seen = now();
    DELETE FROM imgembed.worker_heartbeat WHERE last_seen < now() - interval '1 day';
$$;

-- The table holding a watched table's vectors for a model (default: the table's default model),
-- for queries that read vectors directly: columns id (the key), embedding, job_id, embedded_at.
-- As text it is qualified (imgembed.emb_3_1) unless imgembed is on the search path.
CREATE OR REPLACE FUNCTION imgembed.storage_table(tbl regclass, model text DEFAULT NULL)
RETURNS regclass
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN format('imgembed.%I', (imgembed._watch_model_of(imgembed._watch_of(tbl), model)).storage_table)::regclass;
END $$;
