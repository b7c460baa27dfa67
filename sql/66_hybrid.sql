-- Hybrid search: PostgreSQL's full-text ranking over a table's own text columns, fused with CLIP's
-- text-to-image ranking by reciprocal rank fusion (RRF): a row's score is the sum, over the two
-- rankings, of weight / (rrf_k + its rank there). Rows the captions describe and the pictures show
-- come first; a wrong caption or a picture the model misreads alone cannot carry a row to the top.

-- The SQL tsvector expression of a row (alias s) over its text columns: text and varchar columns
-- are parsed with the text search configuration in $p_config_param, text[] columns word by word,
-- and a tsvector column is taken as it is (its own configuration). Refuses any other column.
CREATE OR REPLACE FUNCTION imgembed._text_tsvector_sql(p_watch imgembed.watch, p_columns text[], p_config_param integer)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_column text;
    v_type text;
    v_parts text[] := '{}';
BEGIN
    IF p_columns IS NULL OR cardinality(p_columns) = 0 THEN
        RAISE EXCEPTION 'name the text columns to search: text_columns => ARRAY[''title'', ''tags''] '
                        '(text, varchar or text[] columns) or a tsvector column'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_column IN ARRAY p_columns LOOP
        SELECT format_type(atttypid, NULL) INTO v_type
          FROM pg_attribute WHERE attrelid = p_watch.tbl AND attname = v_column AND attnum > 0 AND NOT attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'text column "%" does not exist in table %', v_column, p_watch.table_name
                USING ERRCODE = 'undefined_column';
        END IF;
        v_parts := v_parts || CASE v_type
            WHEN 'tsvector' THEN format('coalesce(s.%I, ''''::tsvector)', v_column)
            WHEN 'text' THEN format('to_tsvector($%s, coalesce(s.%I, ''''))', p_config_param, v_column)
            WHEN 'character varying' THEN format('to_tsvector($%s, coalesce(s.%I::text, ''''))', p_config_param, v_column)
            WHEN 'text[]' THEN format('to_tsvector($%s, coalesce(array_to_string(s.%I, '' ''), ''''))',
                                      p_config_param, v_column)
            WHEN 'character varying[]' THEN format('to_tsvector($%s, coalesce(array_to_string(s.%I, '' ''), ''''))',
                                                   p_config_param, v_column)
            END;
        IF v_parts[cardinality(v_parts)] IS NULL THEN
            RAISE EXCEPTION 'column "%" of % has type %; text columns are text, varchar, text[] or tsvector',
                v_column, p_watch.table_name, v_type USING ERRCODE = 'datatype_mismatch';
        END IF;
    END LOOP;
    RETURN array_to_string(v_parts, ' || ');
END $$;

-- Rows matching a text query by both their text columns and their images, best first. Keys come
-- back as text, with the fused score and each ranking's rank (NULL: not among that ranking's
-- `candidates` best). weights: (full text, image). The full-text half matches rows with
-- websearch_to_tsquery(config, query) ("red circle", "red OR blue", "-square") and ranks them by
-- ts_rank_cd; it reads the table as the caller (privileges and row-level security hold). On a large
-- table give it a stored tsvector column with a GIN index.
CREATE OR REPLACE FUNCTION imgembed.search_hybrid(
    tbl regclass,
    query text,
    k integer DEFAULT 10,
    text_columns text[] DEFAULT NULL,
    weights double precision[] DEFAULT ARRAY[1, 1],
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    config regconfig DEFAULT 'english',
    candidates integer DEFAULT 100,
    rrf_k integer DEFAULT 60,
    timeout_seconds double precision DEFAULT 5
) RETURNS TABLE (id text, score double precision, text_rank integer, image_rank integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_model text := (SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id);
    v_document text := imgembed._text_tsvector_sql(v_watch, text_columns, 1);
    v_filter text := imgembed._filter_sql(v_watch, filter, 3);
    v_depth integer;
    v_text_ids text[];
    v_text_ranks integer[];
    v_text_fused double precision[];
    v_image_ids text[];
BEGIN
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'k must be at least 1, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF weights IS NULL OR cardinality(weights) <> 2 OR weights[1] < 0 OR weights[2] < 0 OR weights[1] + weights[2] = 0
       OR array_position(weights, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'weights must be two numbers, (full text, image), at least 0 and not both 0; got %', weights
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rrf_k IS NULL OR rrf_k < 0 THEN
        RAISE EXCEPTION 'rrf_k must be at least 0, got %', rrf_k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query IS NULL OR btrim(query) = '' THEN
        RAISE EXCEPTION 'the text query is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_depth := greatest(coalesce(candidates, 100), k);
    -- Full text: rows tied on ts_rank_cd (the same words in the same places: the same evidence) are
    -- fused with the mean of the ranks they share, and reported with the first of them.
    IF weights[1] > 0 THEN
        EXECUTE format(
            'SELECT coalesce(array_agg(x.id ORDER BY x.r, x.k), ''{}''), coalesce(array_agg(x.r ORDER BY x.r, x.k), ''{}''),'
            '       coalesce(array_agg(x.fused ORDER BY x.r, x.k), ''{}'') FROM ('
            ' SELECT t.k, t.k::text AS id, (rank() OVER (ORDER BY t.score DESC))::integer AS r,'
            '        rank() OVER (ORDER BY t.score DESC) + (count(*) OVER (PARTITION BY t.score) - 1) / 2.0 AS fused FROM ('
            '  SELECT s.%1$I AS k, ts_rank_cd(%2$s, q) AS score'
            '    FROM %3$s s, websearch_to_tsquery($1, $2) q'
            '   WHERE (%2$s) @@ q AND (%4$s)'
            '   ORDER BY 2 DESC, 1 LIMIT $4) t) x',
            v_watch.key_column, v_document, v_watch.tbl, coalesce(v_filter, 'true'))
           INTO v_text_ids, v_text_ranks, v_text_fused
          USING config, query, filter, v_depth;
    END IF;
    IF weights[2] > 0 THEN
        SELECT coalesce(array_agg(r.id), '{}') INTO v_image_ids
          FROM imgembed._knn(v_watch, v_link, imgembed.text_vector(query, v_model, timeout_seconds), v_depth, '{}',
                             filter) r;
    END IF;
    RETURN QUERY
        SELECT coalesce(t.id, i.id),
               coalesce(weights[1] / (rrf_k + t.fused), 0) + coalesce(weights[2] / (rrf_k + i.r), 0),
               t.r::integer, i.r::integer
          FROM unnest(v_text_ids, v_text_ranks, v_text_fused) AS t(id, r, fused)
          FULL JOIN unnest(v_image_ids) WITH ORDINALITY AS i(id, r) ON i.id = t.id
         ORDER BY 2 DESC, i.r NULLS LAST, t.r NULLS LAST, 1
         LIMIT k;
END $$;

CREATE OR REPLACE FUNCTION imgembed.search_hybrid(
    tbl regclass,
    key_type anycompatible,
    query text,
    k integer DEFAULT 10,
    text_columns text[] DEFAULT NULL,
    weights double precision[] DEFAULT ARRAY[1, 1],
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    config regconfig DEFAULT 'english',
    candidates integer DEFAULT 100,
    rrf_k integer DEFAULT 60,
    timeout_seconds double precision DEFAULT 5
) RETURNS TABLE (id anycompatible, score double precision, text_rank integer, image_rank integer)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.score, r.text_rank, r.image_rank'
        '  FROM imgembed.search_hybrid($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) r',
        pg_typeof(key_type))
    USING tbl, query, k, text_columns, weights, model, filter, config, candidates, rrf_k, timeout_seconds;
END $$;
