-- Similarity joins across watched tables: for each row of one table, its k nearest rows of another
-- with the same model (user photos against a catalogue, parts against reference images). Each row
-- of the first table is one k-nearest search of the second (its HNSW index, or an exact scan for
-- small or filtered tables, as in similar()); each role sees only the rows it may read of both.

-- Keys come back as text; the overload with two key-type arguments gives them typed.
CREATE OR REPLACE FUNCTION imgembed.similarity_join(
    a regclass,
    b regclass,
    k integer DEFAULT 5,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (a_id text, b_id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_a imgembed.watch := imgembed._watch_of(a);
    v_b imgembed.watch := imgembed._watch_of(b);
    v_a_link imgembed.watch_model := imgembed._watch_model_of(v_a, model);
    v_b_link imgembed.watch_model;
BEGIN
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'k must be at least 1, not %', coalesce(k::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The same model on both sides: the first table's (by default its default model).
    v_b_link := imgembed._watch_model_of(v_b, (SELECT m.name FROM imgembed.model m WHERE m.id = v_a_link.model_id));
    RETURN QUERY EXECUTE format(
        'SELECT e.id::text, r.id, r.distance FROM imgembed.%I e '
        'CROSS JOIN LATERAL imgembed._knn($1, $2, e.embedding, $3, CASE WHEN $4 THEN ARRAY[e.id::text] ELSE ''{}'' END, '
        '$5, NULL, $6, $7, NULL, NULL, $8) r ORDER BY e.id, r.distance, r.id',
        v_a_link.storage_table)
    USING v_b, v_b_link, k, a = b, filter, exact, ef_search, max_distance;
END $$;

CREATE OR REPLACE FUNCTION imgembed.similarity_join(
    a regclass,
    b regclass,
    a_key_type anyelement,
    b_key_type anycompatible,
    k integer DEFAULT 5,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (a_id anyelement, b_id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT j.a_id::%s, j.b_id::%s, j.distance FROM imgembed.similarity_join($1, $2, $3, $4, $5, $6, $7, $8) j',
        pg_typeof(a_key_type), pg_typeof(b_key_type))
    USING a, b, k, model, filter, ef_search, exact, max_distance;
END $$;
