-- Clustering runs: requested in SQL, performed by a worker (scikit-learn), results in SQL.

-- Ask for a clustering of a table's vectors: k-means with k clusters, or k chosen by silhouette
-- when NULL; HDBSCAN chooses its clusters itself (k must be NULL). Returns the run id;
-- imgembed.cluster_run shows its status.
CREATE OR REPLACE FUNCTION imgembed.cluster(
    tbl regclass,
    k integer DEFAULT NULL,
    method text DEFAULT 'kmeans',
    model text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_run bigint;
BEGIN
    IF method NOT IN ('kmeans', 'minibatch_kmeans', 'hdbscan') THEN
        RAISE EXCEPTION 'unknown clustering method %', method
            USING HINT = 'use kmeans, minibatch_kmeans or hdbscan', ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k IS NOT NULL AND method = 'hdbscan' THEN
        RAISE EXCEPTION 'hdbscan finds the number of clusters itself: k must be NULL'
            USING HINT = 'leave k out, or use method => ''kmeans'' for k clusters', ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k IS NOT NULL AND k < 2 THEN
        RAISE EXCEPTION 'k must be at least 2, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO imgembed.cluster_run (watch_id, model_id, method, k_requested)
    VALUES (v_watch.id, v_link.model_id, method, k) RETURNING id INTO v_run;
    PERFORM imgembed._notify_jobs(1);
    RETURN v_run;
END $$;

-- A dispatcher takes the oldest pending run (or one whose worker died), or NULL.
CREATE OR REPLACE FUNCTION imgembed.claim_cluster_run(p_lease_seconds double precision, p_max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
BEGIN
    UPDATE imgembed.cluster_run
       SET status = 'failed', error = format('worker lost: lease expired %s times', attempts), finished_at = now()
     WHERE status = 'running' AND lease_until < now() AND attempts >= p_max_attempts;
    UPDATE imgembed.cluster_run r
       SET status = 'running', attempts = r.attempts + 1,
           lease_until = now() + make_interval(secs => p_lease_seconds)
     WHERE r.id = (SELECT c.id FROM imgembed.cluster_run c
                    WHERE c.status = 'pending' OR (c.status = 'running' AND c.lease_until < now())
                    ORDER BY c.id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING r.id INTO v_run;
    RETURN v_run;
END $$;

-- What a run asks for: (method, k requested).
CREATE OR REPLACE FUNCTION imgembed.cluster_run_spec(p_run_id bigint)
RETURNS TABLE (method text, k_requested integer)
LANGUAGE sql STABLE AS $$
    SELECT r.method, r.k_requested FROM imgembed.cluster_run r WHERE r.id = p_run_id
$$;

-- The vectors a run clusters: (key, vector) of every embedded row.
CREATE OR REPLACE FUNCTION imgembed.cluster_input(p_run_id bigint)
RETURNS TABLE (key text, embedding @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_storage text;
BEGIN
    SELECT wm.storage_table INTO v_storage FROM imgembed.cluster_run r
      JOIN imgembed.watch_model wm ON wm.watch_id = r.watch_id AND wm.model_id = r.model_id
     WHERE r.id = p_run_id;
    IF v_storage IS NULL THEN
        RAISE EXCEPTION 'cluster run % has no vectors to read (model detached?)', p_run_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format('SELECT e.id::text, e.embedding FROM imgembed.%I e ORDER BY 1', v_storage);
END $$;

-- Store a run's result in one transaction (a rerun of the same run replaces it).
CREATE OR REPLACE FUNCTION imgembed.finish_cluster_run(
    p_run_id bigint,
    p_k integer,
    p_quality double precision,
    p_keys text[],
    p_clusters integer[],
    p_distances double precision[],
    p_centre_clusters integer[],
    p_centres text[],
    p_sizes integer[],
    p_medoids text[],
    p_params jsonb DEFAULT '{}'
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM imgembed.cluster_member WHERE run_id = p_run_id;
    DELETE FROM imgembed.cluster_centre WHERE run_id = p_run_id;
    INSERT INTO imgembed.cluster_member (run_id, key, cluster, distance)
    SELECT p_run_id, m.key, m.cluster, m.distance FROM unnest(p_keys, p_clusters, p_distances) AS m(key, cluster, distance);
    INSERT INTO imgembed.cluster_centre (run_id, cluster, centre, size, medoid_key)
    SELECT p_run_id, c.cluster, c.centre, c.size, c.medoid
      FROM unnest(p_centre_clusters, p_centres, p_sizes, p_medoids) AS c(cluster, centre, size, medoid);
    UPDATE imgembed.cluster_run
       SET status = 'done', k = p_k, quality = p_quality, params = params || p_params, error = NULL,
           finished_at = now(), lease_until = NULL
     WHERE id = p_run_id;
END $$;

CREATE OR REPLACE FUNCTION imgembed.fail_cluster_run(p_run_id bigint, p_error text)
RETURNS void
LANGUAGE sql AS $$
    UPDATE imgembed.cluster_run SET status = 'failed', error = p_error, finished_at = now(), lease_until = NULL
     WHERE id = p_run_id
$$;

-- The rows of one cluster the calling role may read.
CREATE OR REPLACE FUNCTION imgembed._visible_members(p_run_id bigint, p_cluster integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer FROM imgembed.cluster_member m WHERE m.run_id = p_run_id AND m.cluster = p_cluster
$$;

-- The labels of one cluster's rows the calling role may read: label -> count (NULL without a label
-- column).
CREATE OR REPLACE FUNCTION imgembed._label_mix(p_watch_id integer, p_run_id bigint, p_cluster integer)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
    v_mix jsonb;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch w WHERE w.id = p_watch_id;
    IF v_watch.label_column IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT jsonb_object_agg(coalesce(x.label, ''(none)''), x.n) FROM ('
                   ' SELECT s.%I::text AS label, count(*) AS n FROM imgembed.cluster_member mm'
                   ' JOIN %s s ON s.%I = mm.key::%s WHERE mm.run_id = $1 AND mm.cluster = $2 GROUP BY 1) x',
                   v_watch.label_column, v_watch.tbl, v_watch.key_column, v_watch.key_type)
       INTO v_mix USING p_run_id, p_cluster;
    RETURN v_mix;
END $$;

-- One row per cluster of every finished run: size, most central row, and the labels inside it
-- (label_mix: label -> count, NULL when the table has no label column). The view spans tables, so
-- medoid keys are text: the function of the same name gives one table's in their type. A role
-- sees the runs of the tables it may read; under row-level security the size counts its rows, and
-- the most central row shows only when it may read it.
CREATE OR REPLACE VIEW imgembed.cluster_summary WITH (security_barrier) AS
SELECT c.run_id, w.table_name, m.name AS model, r.method, c.cluster,
       CASE WHEN row_security_active(w.tbl) THEN imgembed._visible_members(c.run_id, c.cluster) ELSE c.size END AS size,
       CASE WHEN imgembed._row_visible(w.id, c.medoid_key) THEN c.medoid_key END AS medoid_key,
       imgembed._label_mix(w.id, c.run_id, c.cluster) AS label_mix
  FROM imgembed.cluster_run r
  JOIN imgembed._live_watch w ON w.id = r.watch_id
  JOIN imgembed.model m ON m.id = r.model_id
  JOIN imgembed.cluster_centre c ON c.run_id = r.id
 WHERE r.status = 'done' AND has_table_privilege(w.tbl, 'SELECT');
DROP FUNCTION IF EXISTS imgembed._cluster_summary();

-- The cluster a row belongs to by its nearest centre (latest finished run unless one is named),
-- so rows inserted after a run get a cluster without waiting for a new run.
CREATE OR REPLACE FUNCTION imgembed.nearest_cluster(tbl regclass, key anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, cluster integer, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_run imgembed.cluster_run;
    v_link imgembed.watch_model;
BEGIN
    v_run := imgembed._finished_run(v_watch, nearest_cluster.run_id);
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = v_watch.id AND wm.model_id = v_run.model_id;
    RETURN QUERY
    SELECT v_run.id, c.cluster, (c.centre::@vector@.vector OPERATOR(@vector@.<=>) imgembed._require_vector(v_watch, v_link, key::text))::float8 AS d
      FROM imgembed.cluster_centre c WHERE c.run_id = v_run.id ORDER BY 3 LIMIT 1;
END $$;

-- A finished run of a table: the one named, else the latest.
CREATE OR REPLACE FUNCTION imgembed._finished_run(p_watch imgembed.watch, p_run_id bigint)
RETURNS imgembed.cluster_run
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run;
BEGIN
    SELECT * INTO v_run FROM imgembed.cluster_run r
     WHERE r.watch_id = p_watch.id AND r.status = 'done' AND (p_run_id IS NULL OR r.id = p_run_id)
     ORDER BY r.id DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no finished clustering run%', p_watch.table_name,
                        coalesce(format(' with id %s', p_run_id), '')
            USING HINT = 'run SELECT imgembed.cluster(table) and let a worker finish it', ERRCODE = 'no_data_found';
    END IF;
    RETURN v_run;
END $$;

-- One table's cluster members with keys in its own type (imgembed.cluster_member spans tables and
-- keeps keys as text): cluster_member('products', NULL::bigint), latest finished run unless one
-- is named; by cluster, then nearest its centre first.
CREATE OR REPLACE FUNCTION imgembed.cluster_member(tbl regclass, key_type anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, key anyelement, cluster integer, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run := imgembed._finished_run(imgembed._watch_of(tbl), run_id);
BEGIN
    RETURN QUERY EXECUTE format('SELECT m.run_id, m.key::%1$s, m.cluster, m.distance FROM imgembed.cluster_member m '
                                'WHERE m.run_id = $1 ORDER BY m.cluster, m.distance, m.key::%1$s', pg_typeof(key_type))
    USING v_run.id;
END $$;

-- One table's cluster summary with the medoid in the key's own type: cluster_summary('products',
-- NULL::bigint), latest finished run unless one is named.
CREATE OR REPLACE FUNCTION imgembed.cluster_summary(tbl regclass, key_type anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, model text, method text, cluster integer, size integer, medoid_key anyelement,
               label_mix jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run := imgembed._finished_run(imgembed._watch_of(tbl), run_id);
BEGIN
    RETURN QUERY EXECUTE format('SELECT s.run_id, s.model, s.method, s.cluster, s.size, s.medoid_key::%s, s.label_mix '
                                'FROM imgembed.cluster_summary s WHERE s.run_id = $1 ORDER BY s.cluster',
                                pg_typeof(key_type))
    USING v_run.id;
END $$;
