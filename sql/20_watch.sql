-- Attaching imgembed to tables: watch(), unwatch(), add_model().

-- The HNSW index of one vector table. It indexes half-precision copies of the vectors (half the
-- size and faster to compare, same recall at CLIP dimensions, up to 4,000 dimensions); searches
-- re-rank its candidates with the full-precision vectors (see imgembed._knn).
-- The build reads the table from its first page. With synchronize_seqscans on, a scan of a table
-- larger than a quarter of shared_buffers starts where the last scan of it stopped, so the graph's
-- insertion order, and with it the recall of the index, depended on which queries ran before the
-- build (recall@10 among 50,000 evenly spread vectors: 0.50 against 0.89, same table and settings).
CREATE OR REPLACE FUNCTION imgembed._create_index(
    p_storage text,
    p_dim integer,
    p_m integer DEFAULT 16,
    p_ef_construction integer DEFAULT 64
) RETURNS void
LANGUAGE plpgsql
SET synchronize_seqscans = off
AS $$
BEGIN
    IF p_dim > 4000 THEN
        RAISE NOTICE 'no HNSW index on imgembed.%: pgvector indexes at most 4,000 dimensions; searches scan exactly',
            p_storage;
        RETURN;
    END IF;
    EXECUTE format('CREATE INDEX %I ON imgembed.%I USING hnsw ((embedding::@vector@.halfvec(%s)) @vector@.halfvec_cosine_ops) '
                   'WITH (m = %s, ef_construction = %s)',
                   p_storage || '_hnsw', p_storage, p_dim, p_m, p_ef_construction);
END $$;

-- A vector table shows a role only the rows of the watched table that role may SELECT: its
-- privileges and row-level security on the watched table carry over to every search. The owner
-- (workers and triggers run as it) sees every row. Applied again at every upgrade.
CREATE OR REPLACE FUNCTION imgembed._secure_storage(p_watch imgembed.watch, p_storage text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE imgembed.%I ENABLE ROW LEVEL SECURITY', p_storage);
    IF EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = format('imgembed.%I', p_storage)::regclass
                                         AND polname = 'visible_rows') THEN  -- no NOTICE on every watch
        EXECUTE format('DROP POLICY visible_rows ON imgembed.%I', p_storage);
    END IF;
    -- OFFSET 0 keeps the check a probe of the watched table's key for each row the search looks
    -- at: flattened into a join, the planner would read the whole watched table for every search.
    EXECUTE format('CREATE POLICY visible_rows ON imgembed.%1$I FOR SELECT '
                   'USING (EXISTS (SELECT 1 FROM %2$s s WHERE s.%3$I = %1$I.id OFFSET 0))',
                   p_storage, p_watch.tbl, p_watch.key_column);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        EXECUTE format('GRANT SELECT ON imgembed.%I TO imgembed_reader', p_storage);
    END IF;
END $$;

-- Create the vector table of (watch, model), its HNSW index, and enqueue every existing row (or,
-- for a reduced model, project its source model's vectors).
CREATE OR REPLACE FUNCTION imgembed._attach_model(
    p_watch imgembed.watch,
    p_model imgembed.model,
    p_make_default boolean
) RETURNS imgembed.watch_model
LANGUAGE plpgsql AS $$
DECLARE
    v_storage text := imgembed._storage_name(p_watch.id, p_model.id);
    v_link imgembed.watch_model;
    v_queued bigint;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model WHERE watch_id = p_watch.id AND model_id = p_model.id;
    IF FOUND THEN
        RETURN v_link;
    END IF;
    IF p_model.derived_from IS NOT NULL THEN
        IF p_watch.tbl = ANY (imgembed._query_tables()) THEN
            RETURN NULL;  -- queries under a reduced model are embedded by its source and projected
        END IF;
        -- A reduced model projects its source model's vectors of the table: the source comes too.
        PERFORM imgembed._attach_model(p_watch, source, false) FROM imgembed.model source WHERE source.id = p_model.derived_from;
    END IF;
    EXECUTE format(
        'CREATE TABLE imgembed.%I (id %s PRIMARY KEY, embedding @vector@.vector(%s) NOT NULL, '
        'job_id bigint NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(), content_sha256 bytea)',
        v_storage, p_watch.key_type, p_model.dim);
    -- The SHA-256 of the image bytes each vector was made from: identical bytes are embedded once.
    EXECUTE format('CREATE INDEX %I ON imgembed.%I (content_sha256) WHERE content_sha256 IS NOT NULL',
                   v_storage || '_content', v_storage);
    -- Vectors of up to 1,536 dimensions (6 KB) stay in the row instead of going to TOAST: exact
    -- scans and re-ranking then read one page per row, not three (ten times faster at 512 dims).
    IF p_model.dim <= 1536 THEN
        EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE PLAIN', v_storage);
    END IF;
    PERFORM imgembed._create_index(v_storage, p_model.dim);
    PERFORM imgembed._secure_storage(p_watch, v_storage);
    IF p_make_default THEN
        -- A reduced model made the default as it is attached: its source came first, as the default.
        UPDATE imgembed.watch_model SET is_default = false WHERE watch_id = p_watch.id AND is_default;
    END IF;
    INSERT INTO imgembed.watch_model (watch_id, model_id, storage_table, is_default)
    VALUES (p_watch.id, p_model.id, v_storage,
            p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.watch_model WHERE watch_id = p_watch.id))
    RETURNING * INTO v_link;
    IF p_model.derived_from IS NOT NULL THEN
        PERFORM imgembed._fill_reduced(v_link);  -- no jobs: its vectors are projections (sql/71_reductions.sql)
        RETURN v_link;
    END IF;

    EXECUTE imgembed._enqueue_sql(p_watch, format('%s n', p_watch.tbl), 'true', p_model.id);
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    -- Text queries, label prompts and query images are embedded by every model an image table uses.
    IF p_watch.tbl <> ALL (imgembed._query_tables()) THEN
        PERFORM imgembed._attach_model(ROW(query_watch.*)::imgembed.watch, p_model, false)
           FROM imgembed._live_watch query_watch
          WHERE query_watch.tbl = ANY (imgembed._query_tables())
            AND (query_watch.text_column IS NULL OR p_model.text_tower);  -- texts only for CLIP models
    END IF;
    RETURN v_link;
END $$;

-- Start embedding a watched table with one more model (backfills every row).
CREATE OR REPLACE FUNCTION imgembed.add_model(p_tbl regclass, p_model text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM imgembed._attach_model(imgembed._watch_of(p_tbl), imgembed._model_named(p_model), false);
END $$;

-- Build a watched table's HNSW index again with other settings (pgvector's m and
-- ef_construction: larger is slower to build, bigger, and finds more true neighbours). Writes of
-- new vectors for that table and model wait while it builds; raise maintenance_work_mem first.
CREATE OR REPLACE FUNCTION imgembed.rebuild_index(
    tbl regclass,
    model text DEFAULT NULL,
    m integer DEFAULT 16,
    ef_construction integer DEFAULT 64
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_link.storage_table || '_hnsw');
    PERFORM imgembed._create_index(v_link.storage_table, registered.dim, m, ef_construction)
       FROM imgembed.model registered WHERE registered.id = v_link.model_id;
END $$;

-- Attach to a table with explicit input columns: image bytes (bytea) and/or image location (text);
-- or, for imgembed's own text tables, text to embed with the text tower.
-- Workers read every row of a watched table with the rights of imgembed's owner, with row-level
-- security off (every function that runs with those rights is set so: 95_roles.sql): so no policy
-- of the table, nor any function a policy calls, ever runs with them. A table whose row-level
-- security applies to imgembed's owner (enabled, and the owner neither owns the table nor has
-- BYPASSRLS; or forced) could not be read that way: it is refused here, with what to do.
CREATE OR REPLACE FUNCTION imgembed._require_rows_readable(p_tbl regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_owner oid := (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'imgembed');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_roles r ON r.oid = v_owner
                WHERE c.oid = p_tbl AND c.relrowsecurity AND NOT r.rolbypassrls AND NOT r.rolsuper
                  AND (c.relforcerowsecurity OR c.relowner <> v_owner)) THEN
        RAISE EXCEPTION 'imgembed cannot watch %: its row-level security applies to imgembed''s owner %, whose workers '
                        'read every row and never run a table''s policies with their rights', p_tbl, v_owner::regrole
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('a superuser runs: ALTER ROLE %I BYPASSRLS; (policies then apply to every other role '
                                'as before, and imgembed''s searches show each role only its rows)',
                                (SELECT r.rolname FROM pg_roles r WHERE r.oid = v_owner));
    END IF;
END $$;

CREATE OR REPLACE FUNCTION imgembed._watch(
    p_tbl regclass,
    p_content_column text,
    p_uri_column text,
    p_label_column text DEFAULT NULL,
    p_model text DEFAULT NULL,
    p_text_column text DEFAULT NULL,
    p_replicated boolean DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_relkind "char";
    v_key_column text;
    v_key_type text;
    v_key_count integer;
    v_watch imgembed.watch;
    v_model imgembed.model;
    v_column text;
    v_type text;
BEGIN
    SELECT relkind INTO v_relkind FROM pg_class WHERE oid = p_tbl;
    IF v_relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table (imgembed watches ordinary and partitioned tables)', p_tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF p_tbl::oid IN (SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'imgembed'::regnamespace)
       AND p_tbl <> ALL (imgembed._query_tables() || 'imgembed.image'::regclass) THEN
        RAISE EXCEPTION 'imgembed''s own table % cannot be watched', p_tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    PERFORM imgembed._require_rows_readable(p_tbl);

    SELECT count(*), min(a.attname), min(format_type(a.atttypid, NULL))
      INTO v_key_count, v_key_column, v_key_type
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = p_tbl AND i.indisprimary;
    IF v_key_count = 0 THEN
        RAISE EXCEPTION 'table % has no primary key', p_tbl
            USING HINT = 'imgembed needs a single-column primary key of type bigint, integer, uuid or text',
                  ERRCODE = 'invalid_table_definition';
    ELSIF v_key_count > 1 THEN
        RAISE EXCEPTION 'table % has a composite primary key', p_tbl
            USING HINT = 'imgembed needs a single-column primary key of type bigint, integer, uuid or text',
                  ERRCODE = 'invalid_table_definition';
    ELSIF v_key_type NOT IN ('bigint', 'integer', 'smallint', 'uuid', 'text', 'character varying') THEN
        RAISE EXCEPTION 'primary key %.% has type %, which imgembed does not support', p_tbl, v_key_column, v_key_type
            USING HINT = 'supported key types: bigint, integer, smallint, uuid, text, varchar',
                  ERRCODE = 'datatype_mismatch';
    END IF;

    FOREACH v_column IN ARRAY ARRAY[p_content_column, p_uri_column, p_text_column, p_label_column] LOOP
        CONTINUE WHEN v_column IS NULL;
        SELECT format_type(atttypid, NULL) INTO v_type
          FROM pg_attribute WHERE attrelid = p_tbl AND attname = v_column AND attnum > 0 AND NOT attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" does not exist in table %', v_column, p_tbl
                USING ERRCODE = 'undefined_column';
        END IF;
        IF v_column IS NOT DISTINCT FROM p_content_column AND v_type <> 'bytea' THEN
            RAISE EXCEPTION 'column "%" of % has type %, expected bytea', v_column, p_tbl, v_type
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF v_column IN (p_uri_column, p_text_column) AND v_type NOT IN ('text', 'character varying') THEN
            RAISE EXCEPTION 'column "%" of % has type %, expected text (a path or URI)', v_column, p_tbl, v_type
                USING ERRCODE = 'datatype_mismatch';
        END IF;
    END LOOP;

    SELECT * INTO v_watch FROM imgembed.watch WHERE tbl = p_tbl;
    IF FOUND THEN
        IF v_watch.content_column IS DISTINCT FROM p_content_column
           OR v_watch.uri_column IS DISTINCT FROM p_uri_column THEN
            RAISE EXCEPTION 'table % is already watched with another image column', p_tbl
                USING HINT = 'call imgembed.unwatch() first', ERRCODE = 'duplicate_object';
        END IF;
        IF p_replicated IS DISTINCT FROM v_watch.replicated AND p_replicated IS NOT NULL THEN
            UPDATE imgembed.watch w SET replicated = p_replicated WHERE w.id = v_watch.id;
            PERFORM imgembed._install_triggers(v_watch.id, p_tbl, false);
            PERFORM imgembed._install_triggers(v_watch.id, p.p, true) FROM imgembed._partitions(p_tbl) AS p(p);
        END IF;
        RETURN v_watch.id;
    END IF;

    INSERT INTO imgembed.watch (tbl, table_name, key_column, key_type, content_column, uri_column, text_column,
                                label_column, key_attnum, content_attnum, uri_attnum, text_attnum, label_attnum, tbl_oid,
                                replicated)
    SELECT p_tbl,
           (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = p_tbl),
           v_key_column,
           CASE v_key_type WHEN 'character varying' THEN 'text' ELSE v_key_type END,
           p_content_column, p_uri_column, p_text_column, p_label_column,
           -- by number too: the watch follows renames (08_live_watch.sql)
           max(a.attnum) FILTER (WHERE a.attname = v_key_column),
           max(a.attnum) FILTER (WHERE a.attname = p_content_column),
           max(a.attnum) FILTER (WHERE a.attname = p_uri_column),
           max(a.attnum) FILTER (WHERE a.attname = p_text_column),
           max(a.attnum) FILTER (WHERE a.attname = p_label_column),
           p_tbl::oid,
           coalesce(p_replicated, false)
      FROM pg_attribute a WHERE a.attrelid = p_tbl AND a.attnum > 0 AND NOT a.attisdropped
    RETURNING * INTO v_watch;

    -- On the table, and on every partition of it: a write fires the triggers of the table it names.
    PERFORM imgembed._install_triggers(v_watch.id, p_tbl, false);
    PERFORM imgembed._install_triggers(v_watch.id, p.p, true) FROM imgembed._partitions(p_tbl) AS p(p);

    IF p_model IS NULL THEN
        SELECT * INTO v_model FROM imgembed.model WHERE is_default;
        IF NOT FOUND THEN
            RAISE NOTICE 'imgembed: no model is registered yet; rows of % will be embedded once one is', p_tbl;
            RETURN v_watch.id;
        END IF;
    ELSE
        v_model := imgembed._model_named(p_model);
    END IF;
    PERFORM imgembed._attach_model(v_watch, v_model, true);
    RETURN v_watch.id;
END $$;

-- Watch a table: every row's image (bytea bytes, or text path / file:// / http(s):// URI) gets an
-- embedding; existing rows are backfilled. Returns the watch id. Calling it again changes nothing
-- but the replicated setting, when given. replicated => true: rows that logical replication
-- applies to this table (on a subscriber) are embedded too; it needs the table's owner.
CREATE OR REPLACE FUNCTION imgembed.watch(
    tbl regclass,
    image_column text,
    label_column text DEFAULT NULL,
    model text DEFAULT NULL,
    replicated boolean DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_type text;
BEGIN
    SELECT format_type(atttypid, NULL) INTO v_type
      FROM pg_attribute WHERE attrelid = tbl AND attname = image_column AND attnum > 0 AND NOT attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" does not exist in table %', image_column, tbl
            USING ERRCODE = 'undefined_column';
    ELSIF v_type = 'bytea' THEN
        RETURN imgembed._watch(tbl, image_column, NULL, label_column, model, p_replicated => replicated);
    ELSIF v_type IN ('text', 'character varying') THEN
        RETURN imgembed._watch(tbl, NULL, image_column, label_column, model, p_replicated => replicated);
    END IF;
    RAISE EXCEPTION 'column "%" of % has type %: an image column must be bytea (the bytes) or text (a path or URI)',
        image_column, tbl, v_type USING ERRCODE = 'datatype_mismatch';
END $$;

-- Stop watching a table: drop its triggers, its vectors and its jobs. The table itself is untouched.
-- Works on a watch the table's changes broke too (imgembed.watch_problems).
CREATE OR REPLACE FUNCTION imgembed.unwatch(tbl regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    SELECT * INTO v_watch FROM imgembed.watch w WHERE w.tbl = unwatch.tbl;
    IF NOT FOUND THEN
        v_watch := imgembed._watch_of(tbl);  -- says it is not watched
    END IF;
    PERFORM imgembed._drop_watch(v_watch);
END $$;
