-- Labels from labelled neighbours (kNN: face banks, few-shot) and the predicted_labels view.
-- Labels come from the watched table's label column (watch(..., label_column => 'label')).

-- Distance-weighted vote over the k nearest labelled rows, as scikit-learn's
-- KNeighborsClassifier(weights='distance', metric='cosine') does: weight 1/distance, and when
-- some neighbours are at distance 0 they alone vote. Best label first (ties: alphabetical).
CREATE OR REPLACE FUNCTION imgembed._vote(
    p_watch imgembed.watch,
    p_link imgembed.watch_model,
    p_query @vector@.vector,
    p_k integer,
    p_exclude text[],
    p_exact boolean
) RETURNS TABLE (label text, votes integer, confidence double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
    v_distances double precision[];
BEGIN
    IF p_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column', p_watch.table_name
            USING HINT = 'watch it with label_column => ''your_label_column''', ERRCODE = 'undefined_column';
    END IF;
    SELECT array_agg(n.id ORDER BY n.ord), array_agg(n.distance ORDER BY n.ord) INTO v_ids, v_distances
      FROM imgembed._knn(p_watch, p_link, p_query, p_k, p_exclude, NULL,
                         format('s.%I IS NOT NULL', p_watch.label_column), p_exact) WITH ORDINALITY AS n(id, distance, ord);
    RETURN QUERY EXECUTE format(
        'WITH neighbour AS ('
        '  SELECT s.%1$I::text AS label, u.d FROM unnest($1::text[], $2::float8[]) AS u(id, d)'
        '  JOIN %2$s s ON s.%3$I = u.id::%4$s),'
        ' weighted AS ('
        '  SELECT n.label, CASE WHEN bool_or(n.d <= 1e-12) OVER () THEN (n.d <= 1e-12)::int::float8'
        '                       ELSE 1 / n.d END AS w FROM neighbour n)'
        ' SELECT w.label, count(*)::int, sum(w.w) / nullif(sum(sum(w.w)) OVER (), 0)'
        '   FROM weighted w GROUP BY w.label ORDER BY sum(w.w) DESC, w.label',
        p_watch.label_column, p_watch.tbl, p_watch.key_column, p_watch.key_type)
    USING coalesce(v_ids, '{}'), coalesce(v_distances, '{}');
END $$;

-- Label one row from its k nearest labelled neighbours (itself excluded).
CREATE OR REPLACE FUNCTION imgembed.knn_label(
    tbl regclass,
    key anyelement,
    k integer DEFAULT 5,
    model text DEFAULT NULL,
    exact boolean DEFAULT false
) RETURNS TABLE (label text, votes integer, confidence double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY SELECT * FROM imgembed._vote(
        v_watch, v_link, imgembed._require_vector(v_watch, v_link, key::text), k, ARRAY[key::text], exact);
END $$;

-- Label any vector (a new face against a face bank, say) from the table's labelled rows.
CREATE OR REPLACE FUNCTION imgembed.classify(
    tbl regclass,
    vec @vector@.vector,
    k integer DEFAULT 5,
    model text DEFAULT NULL,
    exact boolean DEFAULT false
) RETURNS TABLE (label text, votes integer, confidence double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN QUERY SELECT * FROM imgembed._vote(v_watch, imgembed._watch_model_of(v_watch, model), vec, k, '{}', exact);
END $$;

-- One table's embedded, unlabelled rows (key order) with the label their p_k nearest labelled
-- neighbours vote for, under the table's default model.
CREATE OR REPLACE FUNCTION imgembed._table_predicted_labels(p_watch imgembed.watch, p_k integer)
RETURNS TABLE (key text, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link imgembed.watch_model;
    v_key text;
    v_vector @vector@.vector;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id AND wm.is_default;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT m.name INTO model FROM imgembed.model m WHERE m.id = v_link.model_id;
    FOR v_key, v_vector IN EXECUTE format(
        'SELECT e.id::text, e.embedding FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE s.%I IS NULL ORDER BY e.id',
        v_link.storage_table, p_watch.tbl, p_watch.key_column, p_watch.label_column)
    LOOP
        key := v_key;
        SELECT v.label, v.confidence INTO label, confidence
          FROM imgembed._vote(p_watch, v_link, v_vector, p_k, ARRAY[v_key], false) v LIMIT 1;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION imgembed._predicted_labels(p_k integer DEFAULT 5)
RETURNS TABLE (table_name text, key text, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed._live_watch w WHERE w.label_column IS NOT NULL AND has_table_privilege(w.tbl, 'SELECT')
                    ORDER BY w.table_name LOOP
        RETURN QUERY SELECT v_watch.table_name, p.* FROM imgembed._table_predicted_labels(v_watch, p_k) p;
    END LOOP;
END $$;

-- Every embedded, unlabelled row of every watched table with a label column, with the label its
-- 5 nearest labelled neighbours vote for (NULL when no row is labelled yet). The view spans
-- tables, so keys are text: the function of the same name gives one table's keys in their type.
CREATE OR REPLACE VIEW imgembed.predicted_labels AS
SELECT * FROM imgembed._predicted_labels(5);

-- One table's predicted labels with keys in its own type: predicted_labels('faces', NULL::text).
CREATE OR REPLACE FUNCTION imgembed.predicted_labels(tbl regclass, key_type anyelement, k integer DEFAULT 5)
RETURNS TABLE (key anyelement, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    IF v_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column', v_watch.table_name
            USING HINT = 'watch it with label_column => ''your_label_column''', ERRCODE = 'undefined_column';
    END IF;
    RETURN QUERY EXECUTE format('SELECT p.key::%s, p.model, p.label, p.confidence '
                                'FROM imgembed._table_predicted_labels($1, $2) p', pg_typeof(key_type))
    USING v_watch, k;
END $$;

-- Few-shot labels by prototype: the label whose mean labelled vector is nearest (Euclidean, as
-- scikit-learn's NearestCentroid), working with one example per label. margin: how much nearer
-- the best label is than the runner-up.
CREATE OR REPLACE FUNCTION imgembed.classify_prototype(tbl regclass, key anyelement, model text DEFAULT NULL)
RETURNS TABLE (label text, distance double precision, margin double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    IF v_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column', v_watch.table_name
            USING HINT = 'watch it with label_column => ''your_label_column''', ERRCODE = 'undefined_column';
    END IF;
    RETURN QUERY EXECUTE format(
        'WITH prototype AS ('
        '  SELECT s.%1$I::text AS label, @vector@.avg(e.embedding) AS centre FROM imgembed.%2$I e JOIN %3$s s ON s.%4$I = e.id'
        '   WHERE s.%1$I IS NOT NULL AND e.id::text <> $2 GROUP BY 1),'
        ' ranked AS (SELECT p.label, (p.centre OPERATOR(@vector@.<->) $1)::float8 AS d FROM prototype p)'
        ' SELECT r.label, r.d, coalesce(lead(r.d) OVER (ORDER BY r.d, r.label) - r.d, ''Infinity''::float8)'
        '   FROM ranked r ORDER BY r.d, r.label LIMIT 1',
        v_watch.label_column, v_link.storage_table, v_watch.tbl, v_watch.key_column)
    USING imgembed._require_vector(v_watch, v_link, key::text), key::text;
END $$;
