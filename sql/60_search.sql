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
        -- A reduced model that is not fitted says so.
        PERFORM imgembed._reduction_source(m.name) FROM imgembed.model m WHERE m.id = p_link.model_id;
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
-- Ties are ordered by the key in its own type (13 before 111). Keyset pagination: rows after
-- (p_after_distance, p_after_id) in that (distance, key) order; p_after_id is the key as text.
-- A relevance cut-off (p_max_distance) keeps only the rows at most that far of the k nearest, on
-- every path alike: fewer than k rows, or none, may come back.
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
    p_after_id text DEFAULT NULL,
    p_max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql
SET hnsw.iterative_scan = 'strict_order'
AS $$
DECLARE
    v_dim integer;
    v_filter text := imgembed._filter_sql(p_watch, p_filter, 4);
    v_template text;
    v_join text;
    v_after text;
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
    -- A vector of a reduced model's source (a CLIP vector an application made itself) is projected.
    IF @vector@.vector_dims(p_query) <> v_dim AND EXISTS (
           SELECT 1 FROM imgembed.model m JOIN imgembed.model s ON s.id = m.derived_from
            WHERE m.id = p_link.model_id AND s.dim = @vector@.vector_dims(p_query)) THEN
        p_query := imgembed._project(p_link.model_id, p_query);
        IF p_query IS NULL THEN
            PERFORM imgembed._reduction_source((SELECT m.name FROM imgembed.model m WHERE m.id = p_link.model_id));
        END IF;
    END IF;
    IF @vector@.vector_dims(p_query) <> v_dim THEN
        RAISE EXCEPTION 'query vector has % dimensions but the model has %', @vector@.vector_dims(p_query), v_dim
            USING ERRCODE = 'data_exception';
    END IF;
    p_exact := p_exact OR v_dim > 4000;  -- no index above 4,000 dimensions (see _create_index)
    -- One query, filled once per path with its ORDER BY (%6$s) and LIMIT (%7$s). The template is a
    -- constant and everything goes in through a single format(): a filter or label value holding
    -- '%' stays data.
    v_template := 'SELECT (array_agg(q.id ORDER BY q.d, q.k))[1:$2], (array_agg(q.d ORDER BY q.d, q.k))[1:$2] FROM ('
        ' SELECT e.id AS k, e.id::text AS id, (e.embedding OPERATOR(@vector@.<=>) $1)::float8 AS d FROM imgembed.%1$I e %2$s'
        ' WHERE e.id::text <> ALL ($3) AND (%3$s) AND (%4$s) AND (%5$s) ORDER BY %6$s LIMIT %7$s) q';
    v_join := CASE WHEN v_filter IS NULL AND p_condition IS NULL THEN ''
                   ELSE format('JOIN %s s ON s.%I = e.id', p_watch.tbl, p_watch.key_column) END;
    v_after := CASE WHEN p_after_distance IS NULL THEN 'true'
                    ELSE '(e.embedding OPERATOR(@vector@.<=>) $1) > $5 OR ((e.embedding OPERATOR(@vector@.<=>) $1) = $5 '
                         || format('AND e.id > $6::%s)', p_watch.key_type) END;

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
        EXECUTE format(v_template, p_link.storage_table, v_join, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'),
                       v_after,
                       format('e.embedding::@vector@.halfvec(%1$s) OPERATOR(@vector@.<=>) $1::@vector@.halfvec(%1$s)', v_dim),
                       '$2 * 2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_exact OR ((v_filter IS NOT NULL OR p_condition IS NOT NULL) AND coalesce(cardinality(v_ids), 0) < p_k) THEN
        -- "+ 0" keeps the planner off the index: an exact scan in (distance, key) order.
        EXECUTE format(v_template, p_link.storage_table, v_join, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'),
                       v_after, '(e.embedding OPERATOR(@vector@.<=>) $1) + 0, e.id', '$2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    PERFORM set_config('hnsw.ef_search', coalesce(v_previous_ef, '40'), true);
    RETURN QUERY SELECT u.id, u.d FROM unnest(v_ids, v_distances) WITH ORDINALITY AS u(id, d, n)
                  WHERE p_max_distance IS NULL OR u.d <= p_max_distance ORDER BY u.n;
END $$;

-- The k images most similar to one row (itself excluded), nearest first. Keys come back in the
-- type of the key given (anycompatible: after_id => 105 goes with key => 42::bigint).
CREATE OR REPLACE FUNCTION imgembed.similar(
    tbl regclass,
    key anycompatible,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anycompatible DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed._knn($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9, $10, $11) r',
        pg_typeof(key))
    USING v_watch, v_link, imgembed._require_vector(v_watch, v_link, key::text), k, ARRAY[key::text],
          filter, exact, ef_search, after_distance, after_id::text, max_distance;
END $$;

-- The k rows nearest to any vector of the model's dimension. Keys come back as text; the
-- overload with a key_type argument (e.g. NULL::bigint) returns them in that type, and takes
-- after_id in it too.
CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, imgembed._watch_model_of(v_watch, model), vec, k, '{}', filter, NULL, exact, ef_search,
        after_distance, after_id, max_distance) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    key_type anycompatible,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anycompatible DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.similar_to_vector($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) r',
        pg_typeof(key_type))
    USING tbl, vec, k, model, filter, ef_search, exact, after_distance, after_id::text, max_distance;
END $$;

-- Pairs of rows whose images are near-identical (cosine distance <= max_distance), each pair once,
-- nearest first, then by key. Each row's per_item nearest neighbours are examined (HNSW), so a
-- group larger than per_item identical images yields only part of its pairs: raise per_item for
-- such data. Keys come back as text; the overload with a key_type argument returns them typed.
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
    IF max_distance IS NULL THEN  -- near_duplicates('t', NULL::bigint) lands here: bigint casts to a distance
        RAISE EXCEPTION 'max_distance is NULL'
            USING HINT = 'for keys in their own type give the type and the distance: '
                         'near_duplicates(''products'', NULL::bigint, 0.02)',
                  ERRCODE = 'null_value_not_allowed';
    END IF;
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

CREATE OR REPLACE FUNCTION imgembed.near_duplicates(
    tbl regclass,
    key_type anyelement,
    max_distance double precision DEFAULT 0.02,
    model text DEFAULT NULL,
    per_item integer DEFAULT 10
) RETURNS TABLE (a anyelement, b anyelement, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT p.a::%1$s, p.b::%1$s, p.distance FROM imgembed.near_duplicates($1, $2, $3, $4) p ORDER BY 3, 1, 2',
        pg_typeof(key_type))
    USING tbl, max_distance, model, per_item;
END $$;
