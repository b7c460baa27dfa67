-- Query images: an image that is in no table (a photo a customer uploads) is searched with like a
-- text query. It becomes a row of imgembed.image_query, one per distinct content (SHA-256) or
-- location, which the workers embed with every model the image tables use; the vector is kept, so
-- the same image asked again is answered at once, and an image whose bytes are already in a
-- watched table costs no forward pass (the workers reuse that vector: vectors_by_content).

-- imgembed.image_query is watched like imgembed.image: bytes or a location (path or URI, read
-- under the same roots and HTTP rules as watched columns), with every model an image table uses.
DO $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM imgembed.watch w WHERE w.tbl = 'imgembed.image_query'::regclass) THEN
        PERFORM imgembed._watch('imgembed.image_query', 'content', 'uri');
    END IF;
    SELECT * INTO v_watch FROM imgembed.watch w WHERE w.tbl = 'imgembed.image_query'::regclass;
    PERFORM imgembed._attach_model(v_watch, m, false)
       FROM imgembed.model m
      WHERE EXISTS (SELECT 1 FROM imgembed.watch_model wm JOIN imgembed.watch w ON w.id = wm.watch_id
                     WHERE wm.model_id = m.id AND w.tbl <> ALL (imgembed._query_tables()));
END $$;

-- Queue a query image as p_role, by its bytes (p_image) or else its location (absolute path,
-- file:// or http(s):// URI; paths are read under IMGEMBED_ALLOWED_ROOTS only); returns its id.
-- Idempotent: the same bytes, or the same location, are one row whoever asks. A location is read
-- once and its vector kept (a file changed in place keeps its first vector); one that could not be
-- read is tried again when it is asked for again. Commit before waiting for it. Runs as its owner:
-- query images are private (no reader may list them); one is at most 32 MB, and a role keeps to
-- its limits (imgembed._query_limits).
CREATE OR REPLACE FUNCTION imgembed._request_image(p_image bytea, p_location text, p_role text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_hash bytea;
    v_id bigint;
    v_watch_id integer := imgembed._query_watch_id('image');
    v_retried integer;
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    IF p_image IS NOT NULL THEN
        IF length(p_image) = 0 THEN
            RAISE EXCEPTION 'the query image is empty' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF length(p_image) > 32 * 1024 * 1024 THEN
            RAISE EXCEPTION 'the query image has % bytes; at most 32 MB are taken', length(p_image)
                USING ERRCODE = 'string_data_right_truncation';
        END IF;
        v_hash := sha256(p_image);
        SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.content_sha256 = v_hash;
    ELSE
        IF p_location IS NULL OR btrim(p_location) = '' THEN
            RAISE EXCEPTION 'the image location is empty' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF length(p_location) > 2000 THEN
            RAISE EXCEPTION 'the image location has % characters; at most 2,000 are taken', length(p_location)
                USING ERRCODE = 'string_data_right_truncation';
        END IF;
        SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.uri = p_location;
    END IF;
    IF v_id IS NULL OR NOT EXISTS (SELECT 1 FROM imgembed.query_request r
                                    WHERE r.kind = 'image' AND r.query_id = v_id AND r.role_name = p_role) THEN
        PERFORM imgembed._check_requests('image', p_role, coalesce(length(p_image), 0));
    END IF;
    IF v_id IS NULL THEN
        IF p_image IS NOT NULL THEN
            INSERT INTO imgembed.image_query (content, content_sha256) VALUES (p_image, v_hash) ON CONFLICT DO NOTHING;
            SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.content_sha256 = v_hash;
        ELSE
            INSERT INTO imgembed.image_query (uri) VALUES (p_location) ON CONFLICT DO NOTHING;
            SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.uri = p_location;
        END IF;
    ELSIF p_image IS NULL THEN
        UPDATE imgembed.job j SET status = 'pending', attempts = 0, not_before = now(), updated_at = now()
         WHERE j.watch_id = v_watch_id AND j.key = v_id::text AND j.status = 'failed'
           AND NOT imgembed._superseded(j.watch_id, j.model_id, j.key);
        GET DIAGNOSTICS v_retried = ROW_COUNT;
        PERFORM imgembed._notify_jobs(v_retried);
    END IF;
    PERFORM imgembed._record_request('image', v_id, p_role);
    RETURN v_id;
END $$;

-- Queue image bytes for embedding (idempotent: the same bytes are one row); returns its id.
-- Commit before waiting for it.
CREATE OR REPLACE FUNCTION imgembed.request_image(image bytea)
RETURNS bigint
LANGUAGE sql AS $$
    SELECT imgembed._request_image(image, NULL, current_user::text)
$$;

-- Queue an image location (absolute path, file:// or http(s):// URI) for embedding; returns its id.
CREATE OR REPLACE FUNCTION imgembed.request_image_at(location text)
RETURNS bigint
LANGUAGE sql AS $$
    SELECT imgembed._request_image(NULL, location, current_user::text)
$$;

-- A query image's state under a model, as p_role asked for it (by the SHA-256 of its bytes, or
-- else its location): its row (NULL: p_role never asked for it), its vector (NULL until a worker
-- embeds it) and, once it failed for good, why. Runs as its owner, so that a role learns about
-- the images it asked for and no others.
CREATE OR REPLACE FUNCTION imgembed._image_state(p_sha256 bytea, p_location text, p_model text, p_role text,
                                                 OUT query_id bigint, OUT vec @vector@.vector, OUT error text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link imgembed.watch_model;
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    SELECT q.id INTO query_id FROM imgembed.image_query q
      JOIN imgembed.query_request r ON r.kind = 'image' AND r.query_id = q.id AND r.role_name = p_role
     WHERE CASE WHEN p_sha256 IS NULL THEN q.uri = p_location ELSE q.content_sha256 = p_sha256 END;
    SELECT wm.* INTO v_link
      FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id JOIN imgembed.model m ON m.id = wm.model_id
     WHERE w.tbl = 'imgembed.image_query'::regclass AND m.name = p_model;
    IF query_id IS NULL OR v_link.storage_table IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT e.embedding FROM imgembed.%I e WHERE e.id = $1', v_link.storage_table) INTO vec USING query_id;
    SELECT j.last_error INTO error FROM imgembed.job j
     WHERE j.watch_id = v_link.watch_id AND j.model_id = v_link.model_id AND j.key = query_id::text AND j.status = 'failed'
       AND NOT imgembed._superseded(j.watch_id, j.model_id, j.key);
END $$;

-- Enqueue a query image as p_role in a transaction of its own (see _request_elsewhere).
CREATE OR REPLACE FUNCTION imgembed._request_image_elsewhere(p_image bytea, p_location text, p_role text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    RETURN imgembed._request_elsewhere(format('SELECT imgembed._request_image(%L::bytea, %L, %L)',
                                              p_image, p_location, p_role));
END $$;

-- The vector of a query image (bytes, or else a location) under a model, waiting up to
-- p_timeout_seconds for a worker to embed it.
CREATE OR REPLACE FUNCTION imgembed._query_image_vector(
    p_image bytea,
    p_location text,
    p_model text,
    p_timeout_seconds double precision
) RETURNS @vector@.vector
LANGUAGE plpgsql AS $$
DECLARE
    v_state record;
    v_hash bytea := sha256(p_image);
    v_what text := CASE WHEN p_image IS NULL THEN format('the image at %s', p_location)
                        ELSE format('the query image (%s bytes)', length(p_image)) END;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => coalesce(p_timeout_seconds, 0));
    v_source imgembed.model := imgembed._reduction_source(p_model);
BEGIN
    IF p_image IS NULL AND p_location IS NULL THEN
        RAISE EXCEPTION 'the query image is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF v_source.id IS NOT NULL THEN
        RETURN imgembed._project((imgembed._model_named(p_model)).id,
                                 imgembed._query_image_vector(p_image, p_location, v_source.name, p_timeout_seconds));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
                     JOIN imgembed.model m ON m.id = wm.model_id
                    WHERE w.tbl = 'imgembed.image_query'::regclass AND m.name = p_model) THEN
        RAISE EXCEPTION 'model % does not embed query images yet', p_model
            USING HINT = 'attach it to an image table with imgembed.add_model()', ERRCODE = 'undefined_object';
    END IF;
    v_state := imgembed._image_state(v_hash, p_location, p_model, current_user::text);
    IF v_state.query_id IS NULL OR (p_image IS NULL AND v_state.error IS NOT NULL) THEN
        IF NOT imgembed._request_image_elsewhere(p_image, p_location, current_user::text) THEN
            IF v_state.query_id IS NULL THEN
                RAISE EXCEPTION '% has not been requested yet', v_what
                    USING HINT = 'run SELECT imgembed.request_image(...) (or request_image_at) in its own transaction '
                                 'first, or install the dblink extension so search_image can do it',
                          ERRCODE = 'object_not_in_prerequisite_state';
            END IF;
        END IF;
    END IF;
    LOOP
        v_state := imgembed._image_state(v_hash, p_location, p_model, current_user::text);
        EXIT WHEN v_state.vec IS NOT NULL;
        IF v_state.error IS NOT NULL THEN
            RAISE EXCEPTION '% could not be embedded: %', v_what, v_state.error
                USING ERRCODE = 'data_exception';
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'no vector for % after % s (model %)', v_what, p_timeout_seconds, p_model
                USING HINT = 'is an imgembed worker running? (imgembed worker; see imgembed.status)',
                      ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
    RETURN v_state.vec;
END $$;

-- The vector of image bytes under a model (embedded by the workers, kept by content).
CREATE OR REPLACE FUNCTION imgembed.image_vector(
    image bytea,
    model text,
    timeout_seconds double precision DEFAULT 5
) RETURNS @vector@.vector
LANGUAGE sql AS $$
    SELECT imgembed._query_image_vector(image, NULL, model, timeout_seconds)
$$;

-- The k rows whose images are nearest to an image in no table (bytes, or else a location), with
-- the filters, paging and cut-off of similar(). Keys come back as text.
CREATE OR REPLACE FUNCTION imgembed._search_image(
    p_tbl regclass, p_image bytea, p_location text, p_k integer, p_model text, p_filter jsonb,
    p_timeout_seconds double precision, p_ef_search integer, p_exact boolean, p_after_distance double precision,
    p_after_id text, p_max_distance double precision
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(p_tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, p_model);
    v_model text := (SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id);
BEGIN
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, v_link, imgembed._query_image_vector(p_image, p_location, v_model, p_timeout_seconds), p_k, '{}',
        p_filter, NULL, p_exact, p_ef_search, p_after_distance, p_after_id, p_max_distance) r;
END $$;

-- Images like these bytes (reverse image search), nearest first. Keys come back as text; the
-- overload with a key_type argument (e.g. NULL::bigint) returns them in that type.
CREATE OR REPLACE FUNCTION imgembed.search_image(
    tbl regclass,
    image bytea,
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
LANGUAGE sql AS $$
    SELECT * FROM imgembed._search_image(tbl, image, NULL, k, model, filter, timeout_seconds, ef_search, exact,
                                         after_distance, after_id, max_distance)
$$;

CREATE OR REPLACE FUNCTION imgembed.search_image(
    tbl regclass,
    key_type anycompatible,
    image bytea,
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
        'SELECT r.id::%s, r.distance FROM imgembed._search_image($1, $2, NULL, $3, $4, $5, $6, $7, $8, $9, $10, $11) r',
        pg_typeof(key_type))
    USING tbl, image, k, model, filter, timeout_seconds, ef_search, exact, after_distance, after_id::text,
          max_distance;
END $$;

-- Images like the one at a location (absolute path, file:// or http(s):// URI, read by the workers
-- under the rules of watched columns), nearest first. As search_image otherwise.
CREATE OR REPLACE FUNCTION imgembed.search_image_at(
    tbl regclass,
    location text,
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
BEGIN
    IF location IS NULL THEN
        RAISE EXCEPTION 'the image location is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY SELECT * FROM imgembed._search_image(tbl, NULL, location, k, model, filter, timeout_seconds, ef_search,
                                                      exact, after_distance, after_id, max_distance);
END $$;

CREATE OR REPLACE FUNCTION imgembed.search_image_at(
    tbl regclass,
    key_type anycompatible,
    location text,
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
        'SELECT r.id::%s, r.distance FROM imgembed.search_image_at($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) r',
        pg_typeof(key_type))
    USING tbl, location, k, model, filter, timeout_seconds, ef_search, exact, after_distance, after_id::text,
          max_distance;
END $$;
