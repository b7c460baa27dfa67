-- Text is data too: queries (imgembed.text_query) and label prompts (imgembed.label_prompt) are
-- rows that the workers embed with the same model as the images, so SQL searches by text
-- without a model inside PostgreSQL.

-- Queue a text for embedding as p_role (idempotent: the same text is one row, whoever asks);
-- returns its id. Commit before waiting for it. Runs as its owner: texts are private (no reader may
-- list them), a text is at most 1,000 characters, and a role keeps to its limits
-- (imgembed._query_limits), so no one can bury the workers in texts.
CREATE OR REPLACE FUNCTION imgembed._request_text(p_query text, p_role text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    IF p_query IS NULL OR btrim(p_query) = '' THEN
        RAISE EXCEPTION 'the text query is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(p_query) > 1000 THEN
        RAISE EXCEPTION 'the text query has % characters; at most 1,000 are embedded', length(p_query)
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = p_query;
    IF v_id IS NULL THEN
        PERFORM imgembed._check_requests('text', p_role, 0);
        INSERT INTO imgembed.text_query (query) VALUES (p_query) ON CONFLICT DO NOTHING;
        SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = p_query;
    END IF;
    PERFORM imgembed._record_request('text', v_id, p_role);
    RETURN v_id;
END $$;

-- Queue a text for embedding (idempotent); returns its id. Commit before waiting for it.
CREATE OR REPLACE FUNCTION imgembed.request_text(query text)
RETURNS bigint
LANGUAGE sql AS $$
    SELECT imgembed._request_text(query, current_user::text)
$$;

-- Whether p_role asked for a text, and then its vector under a model (NULL until a worker embeds
-- it). Runs as its owner, so that a role learns about the texts it asked for and no others.
CREATE OR REPLACE FUNCTION imgembed._text_state(p_query text, p_model text, p_role text, OUT requested boolean,
                                                OUT vec @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_id bigint;
    v_storage text;
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    SELECT t.id INTO v_id FROM imgembed.text_query t
      JOIN imgembed.query_request r ON r.kind = 'text' AND r.query_id = t.id AND r.role_name = p_role
     WHERE t.query = p_query;
    requested := v_id IS NOT NULL;
    SELECT wm.storage_table INTO v_storage
      FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id JOIN imgembed.model m ON m.id = wm.model_id
     WHERE w.tbl = 'imgembed.text_query'::regclass AND m.name = p_model;
    IF requested AND v_storage IS NOT NULL THEN
        EXECUTE format('SELECT e.embedding FROM imgembed.%I e WHERE e.id = $1', v_storage) INTO vec USING v_id;
    END IF;
END $$;

-- A libpq connection string value, quoted.
CREATE OR REPLACE FUNCTION imgembed._conninfo_value(p_value text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT '''' || replace(replace(p_value, '\', '\\'), '''', '\''') || ''''
$$;

-- Run one request (a SELECT returning one bigint) in a transaction of its own, through dblink, so
-- that a worker sees what it queues while the caller's transaction waits. The loopback connection
-- logs in as this database's imgembed_text_<database oid>, a role that may only call request_text
-- and request_image, with the password the migration gave it (kept in imgembed.private_setting,
-- which only the owner reads: only the owner's SECURITY DEFINER functions get past that read).
-- Returns false where that is impossible.
CREATE OR REPLACE FUNCTION imgembed._request_elsewhere(p_request text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_dblink_schema text;
    v_password text := (SELECT s.value FROM imgembed.private_setting s WHERE s.name = 'text_request_password');
    v_connection text;
BEGIN
    SELECT n.nspname INTO v_dblink_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink';
    IF v_dblink_schema IS NULL OR v_password IS NULL
       OR NOT has_function_privilege(format('%I.dblink(text, text)', v_dblink_schema), 'EXECUTE') THEN
        RETURN false;
    END IF;
    v_connection := format('host=%s port=%s dbname=%s user=%s password=%s',
                           imgembed._conninfo_value(coalesce(host(inet_server_addr()), '127.0.0.1')),
                           current_setting('port'), imgembed._conninfo_value(current_database()),
                           imgembed._conninfo_value(imgembed._text_request_role()), imgembed._conninfo_value(v_password));
    EXECUTE format('SELECT t.id FROM %I.dblink($1, $2) AS t(id bigint)', v_dblink_schema)
      USING v_connection, p_request;
    RETURN true;
END $$;

-- Enqueue a text as p_role in a transaction of its own (see _request_elsewhere).
CREATE OR REPLACE FUNCTION imgembed._request_text_elsewhere(p_query text, p_role text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    RETURN imgembed._request_elsewhere(format('SELECT imgembed._request_text(%L, %L)', p_query, p_role));
END $$;

-- The vector of a text under a model, waiting up to p_timeout_seconds for a worker to embed it.
CREATE OR REPLACE FUNCTION imgembed.text_vector(
    query text,
    model text,
    timeout_seconds double precision DEFAULT 5
) RETURNS @vector@.vector
LANGUAGE plpgsql AS $$
DECLARE
    v_state record;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => coalesce(timeout_seconds, 0));
    v_source imgembed.model := imgembed._reduction_source(text_vector.model);
BEGIN
    PERFORM imgembed._require_text_model(text_vector.model);
    IF v_source.id IS NOT NULL THEN
        RETURN imgembed._project((imgembed._model_named(text_vector.model)).id,
                                 imgembed.text_vector(query, v_source.name, timeout_seconds));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
                     JOIN imgembed.model m ON m.id = wm.model_id
                    WHERE w.tbl = 'imgembed.text_query'::regclass AND m.name = text_vector.model) THEN
        RAISE EXCEPTION 'model % does not embed texts yet', text_vector.model
            USING HINT = 'attach it to an image table with imgembed.add_model()', ERRCODE = 'undefined_object';
    END IF;
    v_state := imgembed._text_state(query, model, current_user::text);
    IF NOT v_state.requested THEN
        IF NOT imgembed._request_text_elsewhere(query, current_user::text) THEN
            RAISE EXCEPTION 'text "%" has not been requested yet', query
                USING HINT = format('run SELECT imgembed.request_text(%L) in its own transaction first '
                                    '(or install the dblink extension so search_text can do it)', query),
                      ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    END IF;
    LOOP
        v_state := imgembed._text_state(query, model, current_user::text);
        EXIT WHEN v_state.vec IS NOT NULL;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'no vector for text "%" after % s (model %)', query, timeout_seconds, text_vector.model
                USING HINT = 'is an imgembed worker running? (imgembed worker; see imgembed.status)',
                      ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
    RETURN v_state.vec;
END $$;

-- Images matching a text, nearest first. Keys come back as text; the overload with a key_type
-- argument (e.g. NULL::bigint) returns them in that type, and takes after_id in it too.
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
    after_id text DEFAULT NULL,
    max_distance double precision DEFAULT NULL
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
        ef_search, after_distance, after_id, max_distance) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.search_text(
    tbl regclass,
    key_type anycompatible,
    query text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    timeout_seconds double precision DEFAULT 5,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anycompatible DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.search_text($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) r',
        pg_typeof(key_type))
    USING tbl, query, k, model, filter, timeout_seconds, ef_search, exact, after_distance, after_id::text,
          max_distance;
END $$;

-- The labels (among p_labels, or all) with a prompt whose vector under the model is missing or
-- about to change (queued, running or failed), with the error of a failed one.
CREATE OR REPLACE FUNCTION imgembed._pending_prompt_labels(p_storage text, p_model_id integer, p_labels text[])
RETURNS TABLE (label text, error text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_prompt_watch_id integer := (imgembed._watch_of('imgembed.label_prompt'::regclass)).id;
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT p.label, min(j.last_error) FILTER (WHERE j.status = ''failed'')'
        '  FROM imgembed.label_prompt p'
        '  LEFT JOIN imgembed.job j ON j.watch_id = $2 AND j.key = p.id::text AND j.status <> ''pending'''
        '                          AND j.model_id = $3'
        ' WHERE ($1::text[] IS NULL OR p.label = ANY ($1))'
        '   AND (j.id IS NOT NULL OR NOT EXISTS (SELECT 1 FROM imgembed.%I e WHERE e.id = p.id)'
        '        OR EXISTS (SELECT 1 FROM imgembed.job q WHERE q.watch_id = $2 AND q.model_id = $3'
        '                     AND q.key = p.id::text AND q.status = ''pending'')'
        '        OR EXISTS (SELECT 1 FROM imgembed.intake i WHERE i.watch_id = $2'
        '                     AND (i.model_id IS NULL OR i.model_id = $3) AND p.id::text = ANY (i.keys)))'
        ' GROUP BY p.label ORDER BY p.label',
        p_storage)
    USING p_labels, v_prompt_watch_id, p_model_id;
END $$;

-- Zero-shot labels for one row: each label's prompts (imgembed.label_prompt) are averaged, and
-- labels are ranked by cosine similarity to the image; probability is CLIP's softmax (scale 100).
-- Every prompt counts: while a prompt of a label is still being embedded it waits (up to
-- timeout_seconds), then refuses, naming the labels still pending; a prompt that failed to embed
-- is an error at once.
CREATE OR REPLACE FUNCTION imgembed.zero_shot(
    tbl regclass,
    key anyelement,
    model text DEFAULT NULL,
    labels text[] DEFAULT NULL,
    timeout_seconds double precision DEFAULT 5
) RETURNS TABLE (label text, similarity double precision, probability double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_prompt_watch imgembed.watch := imgembed._watch_of('imgembed.label_prompt'::regclass);
    v_prompt_storage text;
    v_image @vector@.vector := imgembed._require_vector(v_watch, v_link, key::text);
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => coalesce(timeout_seconds, 0));
    v_pending text[];
    v_failed text;
    -- A reduced model's prompts are its source's, projected.
    v_source imgembed.model := imgembed._reduction_source((SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id));
    v_prompt_model_id integer := coalesce(v_source.id, v_link.model_id);
BEGIN
    PERFORM imgembed._require_text_model((SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id));
    SELECT wm.storage_table INTO v_prompt_storage FROM imgembed.watch_model wm
     WHERE wm.watch_id = v_prompt_watch.id AND wm.model_id = v_prompt_model_id;
    IF v_prompt_storage IS NULL THEN
        RAISE EXCEPTION 'model % does not embed label prompts', (SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id)
            USING HINT = 'a model embeds texts once it is registered (imgembed models add)', ERRCODE = 'undefined_object';
    END IF;
    LOOP
        SELECT array_agg(p.label ORDER BY p.label), min(p.label || ': ' || p.error)
          INTO v_pending, v_failed
          FROM imgembed._pending_prompt_labels(v_prompt_storage, v_prompt_model_id, labels) p;
        EXIT WHEN v_pending IS NULL;
        IF v_failed IS NOT NULL THEN
            RAISE EXCEPTION 'a prompt of label % could not be embedded', v_failed
                USING HINT = 'fix or delete the prompt in imgembed.label_prompt (imgembed.failures lists it)',
                      ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'prompts of labels % are not embedded yet (after % s)', array_to_string(v_pending, ', '),
                            timeout_seconds
                USING HINT = 'is an imgembed worker running? (imgembed worker; see imgembed.status)',
                      ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    RETURN QUERY EXECUTE format(
        'WITH per_label AS ('
        '  SELECT p.label, 1 - (%2$s OPERATOR(@vector@.<=>) $1)::float8 AS similarity'
        '    FROM imgembed.label_prompt p JOIN imgembed.%1$I e ON e.id = p.id'
        '   WHERE $2::text[] IS NULL OR p.label = ANY ($2)'
        '   GROUP BY p.label),'
        ' scaled AS (SELECT l.label, l.similarity,'
        '                   exp(100 * (l.similarity - max(l.similarity) OVER ())) AS weight FROM per_label l)'
        ' SELECT x.label, x.similarity, x.weight / sum(x.weight) OVER ()'
        '   FROM scaled x ORDER BY x.similarity DESC, x.label',
        v_prompt_storage,
        CASE WHEN v_source.id IS NULL THEN '@vector@.l2_normalize(@vector@.avg(e.embedding))'
             ELSE 'imgembed._project($3, @vector@.l2_normalize(@vector@.avg(e.embedding)))' END)
    USING v_image, labels, v_link.model_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no label prompt%', CASE WHEN labels IS NULL THEN '' ELSE format(' for labels %s', labels) END
            USING HINT = 'insert rows into imgembed.label_prompt (label, prompt) and let a worker embed them',
                  ERRCODE = 'no_data_found';
    END IF;
END $$;
