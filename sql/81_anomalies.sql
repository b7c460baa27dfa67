-- Anomaly scores from known-good examples only (quality control): a row's score is its mean
-- cosine distance to the k nearest known-good rows; a threshold per (table, model) is calibrated
-- from the good rows' own leave-one-out scores.

-- Declare which rows are known good: a boolean column, or a value of the table's label column.
CREATE OR REPLACE FUNCTION imgembed.set_known_good(tbl regclass, good_column text DEFAULT NULL, good_label text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_type text;
BEGIN
    IF num_nonnulls(good_column, good_label) <> 1 THEN
        RAISE EXCEPTION 'give exactly one of good_column (a boolean column) or good_label (a label value)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF good_column IS NOT NULL THEN
        SELECT format_type(atttypid, NULL) INTO v_type FROM pg_attribute
         WHERE attrelid = tbl AND attname = good_column AND attnum > 0 AND NOT attisdropped;
        IF v_type IS DISTINCT FROM 'boolean' THEN
            RAISE EXCEPTION 'good_column "%" must be a boolean column of %', good_column, v_watch.table_name
                USING ERRCODE = 'datatype_mismatch';
        END IF;
    ELSIF v_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column for good_label', v_watch.table_name
            USING HINT = 'watch it with label_column => ..., or use good_column', ERRCODE = 'undefined_column';
    END IF;
    UPDATE imgembed.watch w SET good_column = set_known_good.good_column, good_label = set_known_good.good_label,
           good_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl
                            AND a.attname = set_known_good.good_column AND NOT a.attisdropped)
     WHERE w.id = v_watch.id;
END $$;

-- SQL condition (source alias s): the row is known good.
CREATE OR REPLACE FUNCTION imgembed._good_sql(p_watch imgembed.watch)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_watch.good_column IS NOT NULL THEN
        RETURN format('s.%I IS TRUE', p_watch.good_column);
    ELSIF p_watch.good_label IS NOT NULL THEN
        RETURN format('s.%I::text = %L', p_watch.label_column, p_watch.good_label);
    END IF;
    RAISE EXCEPTION 'table % has no known-good rows declared', p_watch.table_name
        USING HINT = 'call imgembed.set_known_good(table, good_column => ... or good_label => ...)',
              ERRCODE = 'object_not_in_prerequisite_state';
END $$;

CREATE OR REPLACE FUNCTION imgembed._anomaly_score(
    p_watch imgembed.watch, p_link imgembed.watch_model, p_key text, p_vector @vector@.vector, p_k integer, p_exact boolean
) RETURNS double precision
LANGUAGE sql AS $$
    SELECT avg(n.distance)
      FROM imgembed._knn(p_watch, p_link, p_vector, p_k, ARRAY[p_key], NULL, imgembed._good_sql(p_watch), p_exact) n
$$;

-- Mean cosine distance from one row to its k nearest known-good rows (itself excluded).
CREATE OR REPLACE FUNCTION imgembed.anomaly_score(
    tbl regclass, key anyelement, k integer DEFAULT 5, model text DEFAULT NULL, exact boolean DEFAULT false
) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN imgembed._anomaly_score(v_watch, v_link, key::text, imgembed._require_vector(v_watch, v_link, key::text), k, exact);
END $$;

-- Calibrate the threshold: the given quantile of the good rows' leave-one-out scores. Stored per
-- (table, model) and returned.
CREATE OR REPLACE FUNCTION imgembed.calibrate_anomalies(
    tbl regclass, quantile double precision DEFAULT 0.99, k integer DEFAULT 5, model text DEFAULT NULL
) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_scores double precision[];
    v_threshold double precision;
BEGIN
    IF quantile IS NULL OR quantile <= 0 OR quantile > 1 THEN
        RAISE EXCEPTION 'quantile must be in (0, 1], got %', quantile USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('SELECT array_agg(imgembed._anomaly_score($1, $2, e.id::text, e.embedding, $3, true))'
                   '  FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE %s',
                   v_link.storage_table, v_watch.tbl, v_watch.key_column, imgembed._good_sql(v_watch))
       INTO v_scores USING v_watch, v_link, k;
    IF coalesce(cardinality(v_scores), 0) < 2 THEN
        RAISE EXCEPTION 'table % needs at least 2 embedded known-good rows to calibrate', v_watch.table_name
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT percentile_cont(quantile) WITHIN GROUP (ORDER BY s) INTO v_threshold FROM unnest(v_scores) s;
    INSERT INTO imgembed.anomaly_threshold (watch_id, model_id, k, quantile, threshold, good_rows)
    VALUES (v_watch.id, v_link.model_id, k, quantile, v_threshold, cardinality(v_scores))
    ON CONFLICT (watch_id, model_id) DO UPDATE
       SET k = excluded.k, quantile = excluded.quantile, threshold = excluded.threshold,
           good_rows = excluded.good_rows, calibrated_at = now();
    RETURN v_threshold;
END $$;

-- One table's rows not marked good, with their score under the default model and the calibrated
-- threshold; highest scores first. Nothing before calibrate_anomalies() has run for that model.
CREATE OR REPLACE FUNCTION imgembed._table_anomalies(p_watch imgembed.watch)
RETURNS TABLE (key text, model text, score double precision, threshold double precision, is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_link imgembed.watch_model;
    v_limit record;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id AND wm.is_default;
    SELECT t.threshold, t.k INTO v_limit
      FROM imgembed.anomaly_threshold t WHERE t.watch_id = p_watch.id AND t.model_id = v_link.model_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT x.id, m.name, x.score, $3, x.score > $3 FROM ('
        '  SELECT e.id AS k, e.id::text AS id, imgembed._anomaly_score($1, $2, e.id::text, e.embedding, $4, false) AS score'
        '    FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE NOT coalesce(%s, false)) x'
        '  CROSS JOIN imgembed.model m WHERE m.id = $5 ORDER BY x.score DESC, x.k',
        v_link.storage_table, p_watch.tbl, p_watch.key_column, imgembed._good_sql(p_watch))
    USING p_watch, v_link, v_limit.threshold, v_limit.k, v_link.model_id;
END $$;

CREATE OR REPLACE FUNCTION imgembed._anomalies()
RETURNS TABLE (table_name text, key text, model text, score double precision, threshold double precision,
               is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed._live_watch w
                    WHERE num_nonnulls(w.good_column, w.good_label) = 1 AND has_table_privilege(w.tbl, 'SELECT')
                    ORDER BY w.table_name LOOP
        RETURN QUERY SELECT v_watch.table_name, a.* FROM imgembed._table_anomalies(v_watch) a;
    END LOOP;
END $$;

-- Every row not marked good, in every table with known-good rows and a calibrated threshold:
-- its score and whether it is over the threshold. Highest scores first. The view spans tables, so
-- keys are text: the function of the same name gives one table's keys in their type.
CREATE OR REPLACE VIEW imgembed.anomalies AS
SELECT * FROM imgembed._anomalies();

-- One table's anomaly scores with keys in its own type: anomalies('parts', NULL::bigint).
CREATE OR REPLACE FUNCTION imgembed.anomalies(tbl regclass, key_type anyelement)
RETURNS TABLE (key anyelement, model text, score double precision, threshold double precision, is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    IF num_nonnulls(v_watch.good_column, v_watch.good_label) = 0 THEN
        RAISE EXCEPTION 'table % has no known-good rows', v_watch.table_name
            USING HINT = 'mark them with imgembed.set_known_good()', ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN QUERY EXECUTE format('SELECT a.key::%s, a.model, a.score, a.threshold, a.is_anomaly '
                                'FROM imgembed._table_anomalies($1) a', pg_typeof(key_type))
    USING v_watch;
END $$;
