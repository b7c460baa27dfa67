-- Visual recommendations: near what a user liked, away from what they disliked.

-- Unit vector of sum(weight * vector) over the given rows (rows without a vector are skipped).
CREATE OR REPLACE FUNCTION imgembed._weighted_query(
    p_watch imgembed.watch,
    p_link imgembed.watch_model,
    p_keys text[],
    p_weights double precision[]
) RETURNS @vector@.vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_query @vector@.vector;
BEGIN
    EXECUTE format(
        'SELECT @vector@.l2_normalize(array_agg(c.total ORDER BY c.i)::real[]::@vector@.vector) FROM ('
        '  SELECT x.i, sum(u.w * x.v) AS total'
        '    FROM unnest($1::text[], $2::float8[]) AS u(k, w)'
        '    JOIN imgembed.%I e ON e.id = u.k::%s'
        '   CROSS JOIN LATERAL unnest(e.embedding::real[]) WITH ORDINALITY AS x(v, i)'
        '   GROUP BY x.i) c',
        p_link.storage_table, p_watch.key_type)
    INTO v_query USING p_keys, p_weights;
    IF v_query IS NULL THEN
        RAISE EXCEPTION 'none of the given rows of % has a vector yet', p_watch.table_name
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_query;
END $$;

-- Weights: each liked item 1/|positives|, each disliked item -0.5/|negatives| (Rocchio).
CREATE OR REPLACE FUNCTION imgembed._recommend(
    p_watch imgembed.watch,
    p_link imgembed.watch_model,
    p_positives text[],
    p_positive_weights double precision[],
    p_negatives text[],
    p_negative_weights double precision[],
    p_exclude text[],
    p_k integer,
    p_filter jsonb,
    p_exact boolean,
    p_max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, score double precision)
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_positives), 0) = 0 THEN
        RAISE EXCEPTION 'recommendations need at least one positive item' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT r.id, 1 - r.distance FROM imgembed._knn(
        p_watch, p_link,
        imgembed._weighted_query(p_watch, p_link, p_positives || coalesce(p_negatives, '{}'),
                                 p_positive_weights || coalesce(p_negative_weights, '{}')),
        p_k, p_exclude, p_filter, NULL, p_exact, NULL, NULL, NULL, p_max_distance) r;
END $$;

-- Items like the positives and unlike the negatives, best first; never returns an input.
-- With one positive and no negatives it ranks exactly as similar() of that item.
CREATE OR REPLACE FUNCTION imgembed.recommend(
    tbl regclass,
    positives anyarray,
    negatives anyarray,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    exact boolean DEFAULT false,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anyelement, score double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_positives text[] := ARRAY(SELECT DISTINCT p::text FROM unnest(positives) p WHERE p IS NOT NULL);
    v_negatives text[] := ARRAY(SELECT DISTINCT n::text FROM unnest(negatives) n WHERE n IS NOT NULL);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.score FROM imgembed._recommend($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) r',
        pg_typeof(positives[array_lower(positives, 1)]))
    USING v_watch, imgembed._watch_model_of(v_watch, model),
          v_positives, array_fill(1.0 / greatest(cardinality(v_positives), 1), ARRAY[cardinality(v_positives)]),
          v_negatives, array_fill(-0.5 / greatest(cardinality(v_negatives), 1), ARRAY[cardinality(v_negatives)]),
          v_positives || v_negatives, k, filter, exact, max_distance;
END $$;

-- Recommendations from imgembed.interaction: positive weights are likes, negative weights
-- dislikes (each side normalised, dislikes count half); every item the user already interacted
-- with is excluded. Keys come back as text; the overload with a key_type argument (e.g.
-- NULL::bigint) returns them in that type.
CREATE OR REPLACE FUNCTION imgembed.recommend_for_user(
    tbl regclass,
    user_id text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, score double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_positives text[];
    v_positive_weights double precision[];
    v_negatives text[];
    v_negative_weights double precision[];
    v_seen text[];
BEGIN
    WITH per_item AS (
        SELECT i.item, sum(i.weight)::float8 AS weight FROM imgembed.interaction i
         WHERE i.user_id = recommend_for_user.user_id AND i.tbl = recommend_for_user.tbl GROUP BY i.item),
    normalised AS (
        SELECT p.item, p.weight,
               CASE WHEN p.weight > 0 THEN p.weight / sum(p.weight) FILTER (WHERE p.weight > 0) OVER ()
                    WHEN p.weight < 0 THEN 0.5 * p.weight / sum(-p.weight) FILTER (WHERE p.weight < 0) OVER ()
               END AS share
          FROM per_item p)
    SELECT array_agg(n.item) FILTER (WHERE n.weight > 0), array_agg(n.share) FILTER (WHERE n.weight > 0),
           array_agg(n.item) FILTER (WHERE n.weight < 0), array_agg(n.share) FILTER (WHERE n.weight < 0),
           array_agg(n.item)
      INTO v_positives, v_positive_weights, v_negatives, v_negative_weights, v_seen
      FROM normalised n;
    IF v_positives IS NULL THEN
        RAISE EXCEPTION 'user % has no positive interaction with %', user_id, v_watch.table_name
            USING HINT = 'insert likes into imgembed.interaction (user_id, tbl, item, kind, weight)',
                  ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY SELECT r.id, r.score FROM imgembed._recommend(
        v_watch, imgembed._watch_model_of(v_watch, model), v_positives, v_positive_weights,
        v_negatives, v_negative_weights, v_seen, k, filter, false, max_distance) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.recommend_for_user(
    tbl regclass,
    key_type anyelement,
    user_id text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anyelement, score double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.score FROM imgembed.recommend_for_user($1, $2, $3, $4, $5, $6) r', pg_typeof(key_type))
    USING tbl, user_id, k, model, filter, max_distance;
END $$;

-- The same without negatives.
CREATE OR REPLACE FUNCTION imgembed.recommend(
    tbl regclass,
    positives anyarray,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    exact boolean DEFAULT false,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anyelement, score double precision)
LANGUAGE sql AS $$
    SELECT * FROM imgembed.recommend(tbl, positives, positives[1:0], k, model, filter, exact, max_distance)
$$;
