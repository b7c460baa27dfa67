-- Who asked for each text and query image (imgembed.query_request, revision 0013). A text or an
-- image is stored and embedded once, whoever asks; each role that asks gets a request, refreshed
-- at every ask. A role learns about its own requests only (_text_state, _image_state), keeps to
-- its own limits, forgets its own (forget_queries), and requests expire (expire_queries, which
-- dispatchers run): a text or image nobody asked for within the window goes, with its vectors.
-- "A role" is the role that called: the functions with owner rights take it as an argument, and
-- check that the session may act as it (a member of it, or the loopback login of search_text).

-- The limits on one role's requests, and on all of them. The owner may change one for the database:
-- INSERT INTO imgembed.private_setting (name, value) VALUES ('query_images_per_role', '200');
CREATE OR REPLACE FUNCTION imgembed._query_limits(
    OUT waiting_per_role integer,   -- texts or images of one role waiting for a worker (default 100)
    OUT images_per_role integer,    -- query images one role keeps (1,000)
    OUT bytes_per_role bigint,      -- bytes of the query images one role keeps (256 MB)
    OUT waiting_in_all integer,     -- texts or images waiting for a worker, every role together (10,000)
    OUT kept interval               -- how long a request lasts after it was last made (7 days)
)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(s.value) FILTER (WHERE s.name = 'queries_waiting_per_role')::integer, 100),
           coalesce(max(s.value) FILTER (WHERE s.name = 'query_images_per_role')::integer, 1000),
           coalesce(max(s.value) FILTER (WHERE s.name = 'query_image_bytes_per_role')::bigint, 256::bigint * 1024 * 1024),
           coalesce(max(s.value) FILTER (WHERE s.name = 'queries_waiting_in_all')::integer, 10000),
           coalesce(max(s.value) FILTER (WHERE s.name = 'queries_kept_for')::interval, interval '7 days')
      FROM imgembed.private_setting s
     WHERE s.name IN ('queries_waiting_per_role', 'query_images_per_role', 'query_image_bytes_per_role',
                      'queries_waiting_in_all', 'queries_kept_for')
$$;

-- Refuse a session that may not act as this role.
CREATE OR REPLACE FUNCTION imgembed._may_request_as(p_role text)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF session_user::text = imgembed._text_request_role() THEN
        RETURN;  -- the loopback login of search_text: it requests for the role that searched
    END IF;
    IF p_role IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles r
                                      WHERE r.rolname = p_role AND pg_has_role(session_user, r.oid, 'MEMBER')) THEN
        RAISE EXCEPTION 'this session (%) may not make requests as role %', session_user, p_role
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

-- The table of the texts ('text') or of the query images ('image'), and its watch.
CREATE OR REPLACE FUNCTION imgembed._query_table(p_kind text)
RETURNS regclass
LANGUAGE sql STABLE AS $$
    SELECT CASE p_kind WHEN 'text' THEN 'imgembed.text_query'::regclass ELSE 'imgembed.image_query'::regclass END
$$;

CREATE OR REPLACE FUNCTION imgembed._query_watch_id(p_kind text)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT w.id FROM imgembed.watch w WHERE w.tbl = imgembed._query_table(p_kind)
$$;

-- Refuse a new text or image (p_bytes: its size) that would take a role, or everyone, past the limits.
CREATE OR REPLACE FUNCTION imgembed._check_requests(p_kind text, p_role text, p_bytes bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_limits record := imgembed._query_limits();
    v_watch_id integer := imgembed._query_watch_id(p_kind);
    v_what text := CASE p_kind WHEN 'text' THEN 'texts' ELSE 'query images' END;
    v_waiting bigint;
    v_kept bigint;
    v_bytes bigint;
BEGIN
    SELECT count(*) INTO v_waiting FROM imgembed.query_request r
     WHERE r.kind = p_kind AND r.role_name = p_role
       AND (EXISTS (SELECT 1 FROM imgembed.job j WHERE j.watch_id = v_watch_id AND j.key = r.query_id::text
                                                   AND j.status <> 'failed')
            OR EXISTS (SELECT 1 FROM imgembed.intake i WHERE i.watch_id = v_watch_id AND r.query_id::text = ANY (i.keys)));
    IF v_waiting >= v_limits.waiting_per_role THEN
        RAISE EXCEPTION 'role % has % % waiting for a worker (at most %); try again in a moment', p_role, v_waiting,
                        v_what, v_limits.waiting_per_role
            USING HINT = 'is an imgembed worker running? (see imgembed.status)', ERRCODE = 'too_many_connections';
    END IF;
    IF (SELECT count(*) FROM imgembed.job j WHERE j.watch_id = v_watch_id AND j.status <> 'failed')
       + (SELECT coalesce(sum(cardinality(i.keys)), 0) FROM imgembed.intake i WHERE i.watch_id = v_watch_id)
       >= v_limits.waiting_in_all THEN
        RAISE EXCEPTION 'too many % wait for a worker (%); try again in a moment', v_what, v_limits.waiting_in_all
            USING HINT = 'is an imgembed worker running? (see imgembed.status)', ERRCODE = 'too_many_connections';
    END IF;
    IF p_kind = 'image' THEN
        SELECT count(*), coalesce(sum(length(q.content)), 0) INTO v_kept, v_bytes
          FROM imgembed.query_request r JOIN imgembed.image_query q ON q.id = r.query_id
         WHERE r.kind = 'image' AND r.role_name = p_role;
        IF v_kept >= v_limits.images_per_role OR v_bytes + p_bytes > v_limits.bytes_per_role THEN
            RAISE EXCEPTION 'role % keeps % query images of % bytes (at most % images, % bytes)', p_role, v_kept,
                            v_bytes, v_limits.images_per_role, v_limits.bytes_per_role
                USING HINT = format('forget them with SELECT imgembed.forget_queries(); or let them expire (%s after '
                                    'they were last asked for)', v_limits.kept),
                      ERRCODE = 'disk_full';
        END IF;
    END IF;
END $$;

-- Record (or refresh) a role's request.
CREATE OR REPLACE FUNCTION imgembed._record_request(p_kind text, p_query_id bigint, p_role text)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO imgembed.query_request (kind, query_id, role_name) VALUES (p_kind, p_query_id, p_role)
    ON CONFLICT (kind, query_id, role_name) DO UPDATE SET requested_at = now()
$$;

-- Delete the texts ('text') or query images ('image') that no role asks for any more, among p_ids,
-- or else among those made before p_made_before (their vectors and jobs go with them). Returns how many.
CREATE OR REPLACE FUNCTION imgembed._drop_unrequested(p_kind text, p_ids bigint[],
                                                      p_made_before timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_dropped integer;
BEGIN
    EXECUTE format('DELETE FROM %s q WHERE (q.id = ANY ($1) OR q.created_at < $2) AND NOT EXISTS ('
                   ' SELECT 1 FROM imgembed.query_request r WHERE r.kind = $3 AND r.query_id = q.id)',
                   imgembed._query_table(p_kind))
      USING coalesce(p_ids, '{}'), p_made_before, p_kind;
    GET DIAGNOSTICS v_dropped = ROW_COUNT;
    RETURN v_dropped;
END $$;

-- Forget the calling role's texts and query images (those another role asked for too stay for it).
-- Returns how many requests were forgotten.
CREATE OR REPLACE FUNCTION imgembed._forget_queries(p_role text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_texts bigint[];
    v_images bigint[];
BEGIN
    PERFORM imgembed._may_request_as(p_role);
    WITH forgotten AS (DELETE FROM imgembed.query_request r WHERE r.role_name = p_role RETURNING r.kind, r.query_id)
    SELECT coalesce(array_agg(f.query_id) FILTER (WHERE f.kind = 'text'), '{}'),
           coalesce(array_agg(f.query_id) FILTER (WHERE f.kind = 'image'), '{}')
      INTO v_texts, v_images FROM forgotten f;
    PERFORM imgembed._drop_unrequested('text', v_texts);
    PERFORM imgembed._drop_unrequested('image', v_images);
    RETURN cardinality(v_texts) + cardinality(v_images);
END $$;

CREATE OR REPLACE FUNCTION imgembed.forget_queries()
RETURNS integer
LANGUAGE sql AS $$
    SELECT imgembed._forget_queries(current_user::text)
$$;

-- Requests not made again within p_older_than (default: the limits' window) expire, and the texts
-- and query images nobody asks for any more go, with their vectors (texts and images made before
-- revision 0013 belong to nobody: they go once older than the window). Returns how many went.
-- Dispatchers run it every few minutes.
CREATE OR REPLACE FUNCTION imgembed.expire_queries(p_older_than interval DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz := now() - coalesce(p_older_than, (imgembed._query_limits()).kept);
BEGIN
    DELETE FROM imgembed.query_request r WHERE r.requested_at < v_cutoff;
    RETURN imgembed._drop_unrequested('text', NULL, v_cutoff) + imgembed._drop_unrequested('image', NULL, v_cutoff);
END $$;
