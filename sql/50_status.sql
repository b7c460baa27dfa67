-- What users look at: exact backlog per (table, model), failures, a row's stored vector.

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
    oldest_pending_age interval
)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link record;
BEGIN
    FOR v_link IN
        SELECT w.id AS watch_id, w.tbl, w.table_name, m.id AS model_id, m.name, wm.is_default, wm.storage_table,
               imgembed._has_image_sql(w, 's') AS has_image
          FROM imgembed.watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
          JOIN imgembed.model m ON m.id = wm.model_id
         ORDER BY w.table_name, m.name
    LOOP
        table_name := v_link.table_name;
        model := v_link.name;
        is_default := v_link.is_default;
        EXECUTE format('SELECT count(*) FROM %s s WHERE %s', v_link.tbl, v_link.has_image) INTO "rows";
        EXECUTE format('SELECT count(*) FROM imgembed.%I', v_link.storage_table) INTO embedded;
        SELECT count(*) FILTER (WHERE j.status = 'pending'),
               count(*) FILTER (WHERE j.status = 'in_flight'),
               count(*) FILTER (WHERE j.status = 'failed'),
               now() - min(j.enqueued_at) FILTER (WHERE j.status = 'pending')
          INTO pending, in_flight, failed, oldest_pending_age
          FROM imgembed.job j
         WHERE j.watch_id = v_link.watch_id AND j.model_id = v_link.model_id;
        RETURN NEXT;
    END LOOP;
END $$;

-- Per watched table and model: rows with an image, rows embedded, jobs pending / in flight /
-- failed, and how long the oldest pending job has waited. Counts are exact.
CREATE OR REPLACE VIEW imgembed.status AS
SELECT * FROM imgembed._status_rows();

-- Every failed job with its reason.
CREATE OR REPLACE VIEW imgembed.failures AS
SELECT w.table_name, j.key, m.name AS model, j.attempts, j.last_error, j.updated_at AS failed_at
  FROM imgembed.job j
  JOIN imgembed.watch w ON w.id = j.watch_id
  JOIN imgembed.model m ON m.id = j.model_id
 WHERE j.status = 'failed';

-- A row's stored vector (NULL while it is pending or when its image failed).
CREATE OR REPLACE FUNCTION imgembed.vector_of(tbl regclass, key anyelement, model text DEFAULT NULL)
RETURNS vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN imgembed._stored_vector(v_watch, imgembed._watch_model_of(v_watch, model), key::text);
END $$;
