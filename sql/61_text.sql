-- Text is data too: queries (imgembed.text_query) and label prompts (imgembed.label_prompt) are
-- rows that the workers embed with the same model as the images, so SQL searches by text
-- without a model inside PostgreSQL.

-- Queue a text for embedding (idempotent); returns its id. Commit before waiting for it.
CREATE OR REPLACE FUNCTION imgembed.request_text(query text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    IF query IS NULL OR btrim(query) = '' THEN
        RAISE EXCEPTION 'the text query is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO imgembed.text_query (query) VALUES (request_text.query) ON CONFLICT DO NOTHING;
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = request_text.query;
    RETURN v_id;
END $$;

-- Enqueue a text in a transaction of its own (through dblink, when installed), so a worker can
-- see it while the caller's transaction waits. Returns false where that is impossible.
CREATE OR REPLACE FUNCTION imgembed._request_text_elsewhere(p_query text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_dblink_schema text;
    v_connection text := current_setting('imgembed.dblink_connection', true);
BEGIN
    SELECT n.nspname INTO v_dblink_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink';
    IF v_dblink_schema IS NULL THEN
        RETURN false;
    END IF;
    IF v_connection IS NULL OR v_connection = '' THEN
        v_connection := format('host=%s port=%s dbname=%s user=%s',
                               split_part(current_setting('unix_socket_directories'), ',', 1),
                               current_setting('port'), current_database(), current_user);
    END IF;
    EXECUTE format('SELECT t.id FROM %I.dblink($1, $2) AS t(id bigint)', v_dblink_schema)
      USING v_connection, format('SELECT imgembed.request_text(%L)', p_query);
    RETURN true;
END $$;

-- The vector of a text under a model, waiting up to p_timeout_seconds for a worker to embed it.
CREATE OR REPLACE FUNCTION imgembed.text_vector(
    query text,
    model text,
    timeout_seconds double precision DEFAULT 5
) RETURNS @vector@.vector
LANGUAGE plpgsql AS $$
DECLARE
    v_text_watch imgembed.watch := imgembed._watch_of('imgembed.text_query'::regclass);
    v_link imgembed.watch_model;
    v_id bigint;
    v_vector @vector@.vector;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => coalesce(timeout_seconds, 0));
BEGIN
    SELECT wm.* INTO v_link FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
     WHERE wm.watch_id = v_text_watch.id AND m.name = text_vector.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % does not embed texts yet', text_vector.model
            USING HINT = 'attach it to an image table with imgembed.add_model()', ERRCODE = 'undefined_object';
    END IF;
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = text_vector.query;
    IF v_id IS NULL THEN
        IF NOT imgembed._request_text_elsewhere(query) THEN
            RAISE EXCEPTION 'text "%" has not been requested yet', query
                USING HINT = format('run SELECT imgembed.request_text(%L) in its own transaction first '
                                    '(or install the dblink extension so search_text can do it)', query),
                      ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = text_vector.query;
    END IF;
    LOOP
        v_vector := imgembed._stored_vector(v_text_watch, v_link, v_id::text);
        EXIT WHEN v_vector IS NOT NULL;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'no vector for text "%" after % s (model %)', query, timeout_seconds, text_vector.model
                USING HINT = 'is an imgembed worker running? (imgembed worker; see imgembed.status)',
                      ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
    RETURN v_vector;
END $$;

-- Images matching a text, nearest first. Keys come back as text; the overload with a key_type
-- argument (e.g. NULL::bigint) returns them in that type.
CREATE OR REPLACE FUNCTION imgembed.search_text(
    tbl regclass,
    query text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    timeout_seconds double precision DEFAULT 5,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_model text;
BEGIN
    SELECT m.name INTO v_model FROM imgembed.model m WHERE m.id = v_link.model_id;
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, v_link, imgembed.text_vector(query, v_model, timeout_seconds), k, '{}', filter, NULL, exact,
        ef_search, after_distance, after_id) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.search_text(
    tbl regclass,
    key_type anyelement,
    query text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    timeout_seconds double precision DEFAULT 5,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id anyelement, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.search_text($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) r',
        pg_typeof(key_type))
    USING tbl, query, k, model, filter, timeout_seconds, ef_search, exact, after_distance, after_id;
END $$;

-- Zero-shot labels for one row: each label's prompts (imgembed.label_prompt) are averaged, and
-- labels are ranked by cosine similarity to the image; probability is CLIP's softmax (scale 100).
CREATE OR REPLACE FUNCTION imgembed.zero_shot(
    tbl regclass,
    key anyelement,
    model text DEFAULT NULL,
    labels text[] DEFAULT NULL
) RETURNS TABLE (label text, similarity double precision, probability double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_prompt_watch imgembed.watch := imgembed._watch_of('imgembed.label_prompt'::regclass);
    v_prompt_storage text;
    v_image @vector@.vector := imgembed._require_vector(v_watch, v_link, key::text);
BEGIN
    SELECT wm.storage_table INTO v_prompt_storage FROM imgembed.watch_model wm
     WHERE wm.watch_id = v_prompt_watch.id AND wm.model_id = v_link.model_id;
    IF v_prompt_storage IS NOT NULL THEN
        RETURN QUERY EXECUTE format(
            'WITH per_label AS ('
            '  SELECT p.label, 1 - (@vector@.l2_normalize(@vector@.avg(e.embedding)) OPERATOR(@vector@.<=>) $1)::float8 AS similarity'
            '    FROM imgembed.label_prompt p JOIN imgembed.%I e ON e.id = p.id'
            '   WHERE $2::text[] IS NULL OR p.label = ANY ($2)'
            '   GROUP BY p.label),'
            ' scaled AS (SELECT l.label, l.similarity,'
            '                   exp(100 * (l.similarity - max(l.similarity) OVER ())) AS weight FROM per_label l)'
            ' SELECT x.label, x.similarity, x.weight / sum(x.weight) OVER ()'
            '   FROM scaled x ORDER BY x.similarity DESC, x.label',
            v_prompt_storage)
        USING v_image, labels;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no label prompt has a vector for this model yet'
            USING HINT = 'insert rows into imgembed.label_prompt (label, prompt) and let a worker embed them',
                  ERRCODE = 'no_data_found';
    END IF;
END $$;
