-- Revision 0005, downgrade: back to revision 0004. Row-level security and its policies go, the
-- settings table and the interactions' role column go, the functions added since go, and
-- revision 0004's definitions (sql/ as released with it) are applied again.

DO $$
DECLARE
    v_table text;
BEGIN
    FOR v_table IN
        SELECT c.relname FROM pg_class c
         WHERE c.relnamespace = 'imgembed'::regnamespace AND c.relkind = 'r' AND c.relrowsecurity
    LOOP
        EXECUTE format('DROP POLICY IF EXISTS readable_tables ON imgembed.%I', v_table);
        EXECUTE format('DROP POLICY IF EXISTS visible_rows ON imgembed.%I', v_table);
        EXECUTE format('DROP POLICY IF EXISTS own_rows ON imgembed.%I', v_table);
        EXECUTE format('ALTER TABLE imgembed.%I DISABLE ROW LEVEL SECURITY', v_table);
    END LOOP;
END $$;
ALTER VIEW imgembed.failures RESET (security_barrier);

-- sql/05_optional_extensions.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- dblink lets search_text() enqueue a never-seen text in a transaction of its own. It is
-- optional: without it (or without the right to create it) search_text asks the caller to run
-- imgembed.request_text() first.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS dblink;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'imgembed: dblink not installed (%); search_text needs request_text() first', SQLERRM;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/10_catalog.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Catalog helpers: models, watched tables, names of per-(table, model) vector tables.
-- Every function here is (re)pinned to a fixed search_path by 90_pin_search_path.sql.

-- The watch row of a table, or a clear error when the table is not watched.
CREATE OR REPLACE FUNCTION imgembed._watch_of(p_tbl regclass)
RETURNS imgembed.watch
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    SELECT * INTO v_watch FROM imgembed.watch WHERE tbl = p_tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched by imgembed', p_tbl
            USING HINT = 'call imgembed.watch(''schema.table'', ''image_column'') first',
                  ERRCODE = 'undefined_object';
    END IF;
    RETURN v_watch;
END $$;

-- The model a call should use on a watched table: the named one, else the table's default.
CREATE OR REPLACE FUNCTION imgembed._watch_model_of(p_watch imgembed.watch, p_model text DEFAULT NULL)
RETURNS imgembed.watch_model
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link imgembed.watch_model;
BEGIN
    IF p_model IS NULL THEN
        SELECT * INTO v_link FROM imgembed.watch_model
         WHERE watch_id = p_watch.id AND is_default;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'table % has no embedding model yet', p_watch.table_name
                USING HINT = 'register one with `imgembed migrate` (IMGEMBED_MODEL) or imgembed.add_model()',
                      ERRCODE = 'undefined_object';
        END IF;
    ELSE
        SELECT wm.* INTO v_link
          FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
         WHERE wm.watch_id = p_watch.id AND m.name = p_model;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'model % is not attached to table %', p_model, p_watch.table_name
                USING HINT = 'attach it with imgembed.add_model(table, model)',
                      ERRCODE = 'undefined_object';
        END IF;
    END IF;
    RETURN v_link;
END $$;

-- A registered model by name, or a clear error.
CREATE OR REPLACE FUNCTION imgembed._model_named(p_name text)
RETURNS imgembed.model
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model imgembed.model;
BEGIN
    SELECT * INTO v_model FROM imgembed.model WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % is not registered', p_name
            USING HINT = 'register it with `imgembed models add` or imgembed.register_model()',
                  ERRCODE = 'undefined_object';
    END IF;
    RETURN v_model;
END $$;

-- Whether a pending job exists for this row and model: it supersedes an in-flight or failed one
-- (the row changed meanwhile, and the pending job will read its current image).
CREATE OR REPLACE FUNCTION imgembed._superseded(p_watch_id integer, p_model_id integer, p_key text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM imgembed.job p
                    WHERE p.status = 'pending' AND p.watch_id = p_watch_id AND p.model_id = p_model_id
                      AND p.key = p_key)
$$;

-- Wake the dispatchers when jobs were queued. The payload is constant, so PostgreSQL folds the
-- notifications of one transaction into one.
CREATE OR REPLACE FUNCTION imgembed._notify_jobs(p_queued bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_queued > 0 THEN
        PERFORM pg_notify('imgembed_jobs', '');
    END IF;
END $$;

-- Register (or confirm) a model. Its name is what workers load: `imgembed-tiny`, `ARCH:TAG` or
-- `ARCH:/path/to/checkpoint`. The dimension must match what the model outputs.
CREATE OR REPLACE FUNCTION imgembed.register_model(
    p_name text,
    p_architecture text,
    p_pretrained text,
    p_dim integer,
    p_sha256 text DEFAULT NULL,
    p_make_default boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model;
    v_watch imgembed.watch;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'model name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_model FROM imgembed.model WHERE name = p_name;
    IF FOUND THEN
        IF v_model.dim <> p_dim THEN
            RAISE EXCEPTION 'model % is registered with dimension %, not %', p_name, v_model.dim, p_dim
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE imgembed.model SET sha256 = coalesce(p_sha256, sha256) WHERE id = v_model.id;
    ELSE
        INSERT INTO imgembed.model (name, architecture, pretrained, sha256, dim)
        VALUES (p_name, p_architecture, p_pretrained, p_sha256, p_dim)
        RETURNING * INTO v_model;
    END IF;

    IF p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.model WHERE is_default) THEN
        UPDATE imgembed.model SET is_default = false WHERE is_default AND id <> v_model.id;
        UPDATE imgembed.model SET is_default = true WHERE id = v_model.id;
        -- Watched tables that have no model yet (e.g. imgembed.image after migrating) start now.
        FOR v_watch IN
            SELECT w.* FROM imgembed.watch w
             WHERE NOT EXISTS (SELECT 1 FROM imgembed.watch_model wm WHERE wm.watch_id = w.id)
        LOOP
            PERFORM imgembed._attach_model(v_watch, v_model, true);
        END LOOP;
    END IF;
    RETURN v_model.id;
END $$;

-- Name of the vector table for one (watched table, model).
CREATE OR REPLACE FUNCTION imgembed._storage_name(p_watch_id integer, p_model_id integer)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format('emb_%s_%s', p_watch_id, p_model_id)
$$;

-- The columns a watch embeds: image bytes, image location, or (imgembed's own tables) text.
CREATE OR REPLACE FUNCTION imgembed._input_columns(p_watch imgembed.watch)
RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_remove(ARRAY[p_watch.content_column, p_watch.uri_column, p_watch.text_column], NULL)
$$;

-- SQL boolean expression: the row under alias p_alias has something to embed.
CREATE OR REPLACE FUNCTION imgembed._has_image_sql(p_watch imgembed.watch, p_alias text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(format('%I.%I IS NOT NULL', p_alias, c), ' OR ')
      FROM unnest(imgembed._input_columns(p_watch)) AS c
$$;

-- SQL boolean expression: what is embedded differs between aliases o (old) and n (new).
CREATE OR REPLACE FUNCTION imgembed._image_changed_sql(p_watch imgembed.watch)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(format('o.%1$I IS DISTINCT FROM n.%1$I', c), ' OR ')
      FROM unnest(imgembed._input_columns(p_watch)) AS c
$$;

-- SQL that queues the keys of the rows with an image in p_from (aliased n) for embedding: one
-- intake row per 10,000 keys; dispatchers expand them into jobs (expand_intake).
CREATE OR REPLACE FUNCTION imgembed._enqueue_sql(
    p_watch imgembed.watch,
    p_from text,
    p_where text DEFAULT 'true',
    p_model_id integer DEFAULT NULL
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format($f$
        INSERT INTO imgembed.intake (watch_id, model_id, keys)
        SELECT %1$s, %4$s, array_agg(q.key)
          FROM (SELECT n.%2$I::text AS key, (row_number() OVER ()) / 10000 AS chunk
                  FROM %3$s WHERE (%5$s) AND (%6$s)) q
         GROUP BY q.chunk$f$,
        p_watch.id,
        p_watch.key_column,
        p_from,
        coalesce(p_model_id::text, 'NULL::integer'),
        imgembed._has_image_sql(p_watch, 'n'),
        p_where)
$$;

-- SQL statements that forget the rows (vectors and jobs) whose keys are in p_from aliased o.
-- Jobs go first: a worker finishing one of them holds its lock, so the vector delete that
-- follows sees what that worker wrote.
CREATE OR REPLACE FUNCTION imgembed._forget_sql(p_watch imgembed.watch, p_from text, p_where text DEFAULT 'true')
RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY[
        format('DELETE FROM imgembed.job j USING %s WHERE j.watch_id = %s AND j.status = ''pending'' '
               'AND j.key = o.%I::text AND (%s)', p_from, p_watch.id, p_watch.key_column, p_where),
        format('DELETE FROM imgembed.job j USING %s WHERE j.watch_id = %s AND j.status <> ''pending'' '
               'AND j.key = o.%I::text AND (%s)', p_from, p_watch.id, p_watch.key_column, p_where)
    ] || coalesce((
            SELECT array_agg(
                format('DELETE FROM imgembed.%I e USING %s WHERE e.id = o.%I AND (%s)',
                       wm.storage_table, p_from, p_watch.key_column, p_where)
                ORDER BY wm.model_id)
              FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id), '{}')
$$;

-- Delete the jobs (and queued intake) of a watch, or of one of its models.
CREATE OR REPLACE FUNCTION imgembed._delete_jobs(p_watch_id integer, p_model_id integer DEFAULT NULL)
RETURNS void
LANGUAGE sql AS $$
    DELETE FROM imgembed.intake
     WHERE watch_id = p_watch_id AND (p_model_id IS NULL OR model_id = p_model_id);
    DELETE FROM imgembed.job
     WHERE watch_id = p_watch_id AND status = 'pending' AND (p_model_id IS NULL OR model_id = p_model_id);
    DELETE FROM imgembed.job
     WHERE watch_id = p_watch_id AND status <> 'pending' AND (p_model_id IS NULL OR model_id = p_model_id);
$$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/20_watch.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Attaching imgembed to tables: watch(), unwatch(), add_model().

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

-- Create the vector table of (watch, model), its HNSW index, and enqueue every existing row.
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
    EXECUTE format(
        'CREATE TABLE imgembed.%I (id %s PRIMARY KEY, embedding @vector@.vector(%s) NOT NULL, '
        'job_id bigint NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now())',
        v_storage, p_watch.key_type, p_model.dim);
    -- Vectors of up to 1,536 dimensions (6 KB) stay in the row instead of going to TOAST: exact
    -- scans and re-ranking then read one page per row, not three (ten times faster at 512 dims).
    IF p_model.dim <= 1536 THEN
        EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE PLAIN', v_storage);
    END IF;
    PERFORM imgembed._create_index(v_storage, p_model.dim);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        EXECUTE format('GRANT SELECT ON imgembed.%I TO imgembed_reader', v_storage);
    END IF;
    INSERT INTO imgembed.watch_model (watch_id, model_id, storage_table, is_default)
    VALUES (p_watch.id, p_model.id, v_storage,
            p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.watch_model WHERE watch_id = p_watch.id))
    RETURNING * INTO v_link;

    EXECUTE imgembed._enqueue_sql(p_watch, format('%s n', p_watch.tbl), 'true', p_model.id);
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    -- Text queries and label prompts are embedded by every model an image table uses.
    IF p_watch.text_column IS NULL THEN
        PERFORM imgembed._attach_model(text_watch, p_model, false)
           FROM imgembed.watch text_watch WHERE text_watch.text_column IS NOT NULL;
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
CREATE OR REPLACE FUNCTION imgembed._watch(
    p_tbl regclass,
    p_content_column text,
    p_uri_column text,
    p_label_column text DEFAULT NULL,
    p_model text DEFAULT NULL,
    p_text_column text DEFAULT NULL
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
       AND p_tbl NOT IN ('imgembed.image'::regclass, 'imgembed.text_query'::regclass, 'imgembed.label_prompt'::regclass) THEN
        RAISE EXCEPTION 'imgembed''s own table % cannot be watched', p_tbl USING ERRCODE = 'wrong_object_type';
    END IF;

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
        RETURN v_watch.id;
    END IF;

    INSERT INTO imgembed.watch (tbl, table_name, key_column, key_type, content_column, uri_column, text_column,
                                label_column)
    VALUES (p_tbl,
            (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = p_tbl),
            v_key_column,
            CASE v_key_type WHEN 'character varying' THEN 'text' ELSE v_key_type END,
            p_content_column, p_uri_column, p_text_column, p_label_column)
    RETURNING * INTO v_watch;

    EXECUTE format('CREATE TRIGGER imgembed_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS imgembed_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_insert(%s)', p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'NEW TABLE AS imgembed_new FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_update(%s)',
                   p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_delete(%s)', p_tbl, v_watch.id);
    EXECUTE format('CREATE TRIGGER imgembed_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_truncate(%s)', p_tbl, v_watch.id);

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
-- embedding; existing rows are backfilled. Returns the watch id. Calling it again is a no-op.
CREATE OR REPLACE FUNCTION imgembed.watch(
    tbl regclass,
    image_column text,
    label_column text DEFAULT NULL,
    model text DEFAULT NULL
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
        RETURN imgembed._watch(tbl, image_column, NULL, label_column, model);
    ELSIF v_type IN ('text', 'character varying') THEN
        RETURN imgembed._watch(tbl, NULL, image_column, label_column, model);
    END IF;
    RAISE EXCEPTION 'column "%" of % has type %: an image column must be bytea (the bytes) or text (a path or URI)',
        image_column, tbl, v_type USING ERRCODE = 'datatype_mismatch';
END $$;

-- Stop watching a table: drop its triggers, its vectors and its jobs. The table itself is untouched.
CREATE OR REPLACE FUNCTION imgembed.unwatch(tbl regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_storage text;
    v_trigger text;
BEGIN
    FOREACH v_trigger IN ARRAY ARRAY['imgembed_insert', 'imgembed_update', 'imgembed_delete', 'imgembed_truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_trigger, tbl);
    END LOOP;
    FOR v_storage IN SELECT storage_table FROM imgembed.watch_model WHERE watch_id = v_watch.id LOOP
        EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_storage);
    END LOOP;
    PERFORM imgembed._delete_jobs(v_watch.id);
    DELETE FROM imgembed.watch WHERE id = v_watch.id;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/30_triggers.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Statement-level triggers on watched tables. They run in the writer's transaction, enqueue one
-- job per changed row and model, and send at most one constant NOTIFY per statement (PostgreSQL
-- folds identical notifications of a transaction into one).
-- TG_ARGV[0] is the watch id. Transition tables are only visible in the trigger function itself,
-- so the SQL is built by helpers and executed here.

CREATE OR REPLACE FUNCTION imgembed._on_insert()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_queued bigint;
BEGIN
    SELECT * INTO v_watch FROM imgembed.watch WHERE id = TG_ARGV[0]::integer;
    EXECUTE imgembed._enqueue_sql(v_watch, 'imgembed_new n');
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION imgembed._on_update()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_queued bigint;
    v_statement text;
BEGIN
    SELECT * INTO v_watch FROM imgembed.watch WHERE id = TG_ARGV[0]::integer;
    -- Rows whose key vanished (key changed) or whose image was cleared: forget them.
    FOREACH v_statement IN ARRAY imgembed._forget_sql(
        v_watch,
        format('imgembed_old o LEFT JOIN imgembed_new n ON n.%1$I = o.%1$I', v_watch.key_column),
        format('n.%I IS NULL OR NOT (%s)', v_watch.key_column, imgembed._has_image_sql(v_watch, 'n')))
    LOOP
        EXECUTE v_statement;
    END LOOP;
    -- Rows with a new key or a changed image: embed again. Other column updates cost nothing more.
    EXECUTE imgembed._enqueue_sql(
        v_watch,
        format('imgembed_new n LEFT JOIN imgembed_old o ON o.%1$I = n.%1$I', v_watch.key_column),
        format('o.%I IS NULL OR %s', v_watch.key_column, imgembed._image_changed_sql(v_watch)));
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION imgembed._on_delete()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_statement text;
BEGIN
    SELECT * INTO v_watch FROM imgembed.watch WHERE id = TG_ARGV[0]::integer;
    FOREACH v_statement IN ARRAY imgembed._forget_sql(v_watch, 'imgembed_old o') LOOP
        EXECUTE v_statement;
    END LOOP;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION imgembed._on_truncate()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch_id integer := TG_ARGV[0]::integer;
    v_storage text;
BEGIN
    PERFORM imgembed._delete_jobs(v_watch_id);
    FOR v_storage IN SELECT storage_table FROM imgembed.watch_model WHERE watch_id = v_watch_id LOOP
        EXECUTE format('TRUNCATE imgembed.%I', v_storage);
    END LOOP;
    RETURN NULL;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/40_queue.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- The job queue: claimed by dispatchers, leased to workers, finished in one transaction with the
-- vectors it produced. A claim id ties a batch to the one task that may finish it, so a stale
-- Celery message (redelivered after its lease expired) can never write or complete anything.

-- Turn up to p_max_rows intake rows into jobs: one per (key, model attached to the table), at
-- most one pending per row and model. Returns the number of intake rows expanded.
CREATE OR REPLACE FUNCTION imgembed.expand_intake(p_max_rows integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_intake imgembed.intake;
    v_expanded integer := 0;
BEGIN
    FOR v_intake IN
        SELECT * FROM imgembed.intake ORDER BY id LIMIT p_max_rows FOR UPDATE SKIP LOCKED
    LOOP
        INSERT INTO imgembed.job (watch_id, model_id, key, enqueued_at)
        SELECT v_intake.watch_id, wm.model_id, k.key, v_intake.created_at
          FROM unnest(v_intake.keys) AS k(key)
          JOIN imgembed.watch_model wm
            ON wm.watch_id = v_intake.watch_id AND (v_intake.model_id IS NULL OR wm.model_id = v_intake.model_id)
        ON CONFLICT (watch_id, model_id, key) WHERE status = 'pending' DO NOTHING;
        DELETE FROM imgembed.intake WHERE id = v_intake.id;
        v_expanded := v_expanded + 1;
    END LOOP;
    RETURN v_expanded;
END $$;

-- Claim up to p_batch_size pending jobs of one model (the model of the oldest pending job).
-- Returns nothing when no job is ready. The attempt is counted when a worker starts the claim, so
-- a claim that waited in the broker past its lease costs its jobs no attempt.
CREATE OR REPLACE FUNCTION imgembed.claim_batch(p_batch_size integer, p_lease_seconds double precision)
RETURNS TABLE (claim_id uuid, model_name text, job_ids bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_claim uuid := gen_random_uuid();
    v_model_id integer;
BEGIN
    SELECT j.model_id INTO v_model_id
      FROM imgembed.job j
     WHERE j.status = 'pending' AND j.not_before <= now()
     ORDER BY j.id
     LIMIT 1
     FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT j.id FROM imgembed.job j
         WHERE j.status = 'pending' AND j.not_before <= now() AND j.model_id = v_model_id
         ORDER BY j.id
         LIMIT p_batch_size
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE imgembed.job j
           SET status = 'in_flight', claim_id = v_claim,
               lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
          FROM picked WHERE j.id = picked.id
        RETURNING j.id
    )
    SELECT v_claim, m.name, array_agg(c.id ORDER BY c.id)
      FROM claimed c CROSS JOIN imgembed.model m
     WHERE m.id = v_model_id
     GROUP BY m.name;
END $$;

-- Jobs in flight now (the dispatcher's back-pressure).
CREATE OR REPLACE FUNCTION imgembed.in_flight_count()
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM imgembed.job WHERE status = 'in_flight'
$$;

-- A worker starts on a claim: extend the lease, count an attempt, return the jobs it still owns.
CREATE OR REPLACE FUNCTION imgembed.start_claim(p_claim uuid, p_lease_seconds double precision)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE imgembed.job
       SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now(),
           attempts = attempts + 1
     WHERE claim_id = p_claim AND status = 'in_flight'
    RETURNING id
$$;

-- Hand a claim back untouched (the dispatcher could not send its task): no attempt is counted.
CREATE OR REPLACE FUNCTION imgembed.release_claim(p_claim uuid)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_released integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.claim_id = p_claim AND j.status = 'in_flight'
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    RETURN v_released;
END $$;

-- Jobs whose lease ran out (their worker died or hung) go back to pending, or fail after
-- p_max_attempts. A job superseded by a newer pending one for the same row is dropped.
CREATE OR REPLACE FUNCTION imgembed.recover_expired(p_max_attempts integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_recovered integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.status = 'in_flight' AND j.lease_until < now()
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    WITH expired AS (
        SELECT id FROM imgembed.job
         WHERE status = 'in_flight' AND lease_until < now()
         FOR UPDATE SKIP LOCKED
    )
    UPDATE imgembed.job j
       SET status = CASE WHEN j.attempts >= p_max_attempts THEN 'failed' ELSE 'pending' END,
           last_error = CASE WHEN j.attempts = 0
               THEN 'lease expired before a worker started the claim (queued too long: raise IMGEMBED_LEASE_SECONDS '
                    'or lower IMGEMBED_MAX_IN_FLIGHT)'
               ELSE format('worker lost: lease expired (attempt %s of %s)', j.attempts, p_max_attempts) END,
           claim_id = NULL, lease_until = NULL, updated_at = now()
      FROM expired WHERE j.id = expired.id;
    GET DIAGNOSTICS v_recovered = ROW_COUNT;
    RETURN v_recovered;
END $$;

-- What a claim's jobs embed (image bytes, image location or text), read from the watched tables.
-- A job whose row is gone is absent.
CREATE OR REPLACE FUNCTION imgembed.claimed_images(p_claim uuid)
RETURNS TABLE (job_id bigint, key text, content bytea, uri text, body text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN
        SELECT w.* FROM imgembed.watch w
         WHERE w.id IN (SELECT j.watch_id FROM imgembed.job j WHERE j.claim_id = p_claim)
    LOOP
        RETURN QUERY EXECUTE format(
            'SELECT j.id, j.key, %s, %s, %s FROM imgembed.job j JOIN %s s ON s.%I = j.key::%s '
            'WHERE j.claim_id = $1 AND j.watch_id = $2 AND j.status = ''in_flight''',
            CASE WHEN v_watch.content_column IS NULL THEN 'NULL::bytea'
                 ELSE format('s.%I', v_watch.content_column) END,
            CASE WHEN v_watch.uri_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.uri_column) END,
            CASE WHEN v_watch.text_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.text_column) END,
            v_watch.tbl, v_watch.key_column, v_watch.key_type)
        USING p_claim, v_watch.id;
    END LOOP;
END $$;

-- Finish a claim in one transaction: write the vectors of p_done_ids (a NULL vector means the row
-- is gone: nothing to write), complete those jobs, and record p_failed_ids with their errors
-- (retried with exponential backoff when p_retryable and attempts remain, else failed).
-- Only jobs this claim still owns are touched. Returns the number of vectors written.
CREATE OR REPLACE FUNCTION imgembed.finish_batch(
    p_claim uuid,
    p_done_ids bigint[],
    p_vectors @vector@.vector[],
    p_failed_ids bigint[],
    p_errors text[],
    p_retryable boolean[],
    p_max_attempts integer,
    p_backoff_seconds double precision
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_owned bigint[];
    v_written integer := 0;
    v_count integer;
    v_target record;
BEGIN
    -- Lock what we own. A job locked by someone else is being deleted with its row (or recovered):
    -- skip it rather than wait, so a writer deleting rows never deadlocks with us.
    SELECT coalesce(array_agg(id), '{}') INTO v_owned
      FROM (SELECT id FROM imgembed.job
             WHERE claim_id = p_claim AND status = 'in_flight'
             ORDER BY id FOR UPDATE SKIP LOCKED) owned;

    FOR v_target IN
        SELECT w.tbl, w.key_column, w.key_type, w.id AS watch_id, wm.storage_table
          FROM imgembed.watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
         WHERE (w.id, wm.model_id) IN (SELECT j.watch_id, j.model_id FROM imgembed.job j WHERE j.id = ANY (v_owned))
    LOOP
        EXECUTE format($f$
            INSERT INTO imgembed.%1$I AS e (id, embedding, job_id)
            SELECT s.%3$I, v.vec, j.id
              FROM unnest($1::bigint[], $2::@vector@.vector[]) AS v(job_id, vec)
              JOIN imgembed.job j ON j.id = v.job_id
              JOIN %2$s s ON s.%3$I = j.key::%4$s
             WHERE v.vec IS NOT NULL AND j.id = ANY ($3) AND j.watch_id = $4
            ON CONFLICT (id) DO UPDATE
               SET embedding = excluded.embedding, job_id = excluded.job_id, embedded_at = now()
             WHERE e.job_id < excluded.job_id$f$,
            v_target.storage_table, v_target.tbl, v_target.key_column, v_target.key_type)
        USING p_done_ids, p_vectors, v_owned, v_target.watch_id;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_written := v_written + v_count;
    END LOOP;

    -- A success makes older failures of the same row and model moot.
    DELETE FROM imgembed.job f
     USING imgembed.job d
     WHERE d.id = ANY (v_owned) AND d.id = ANY (p_done_ids)
       AND f.status = 'failed' AND f.watch_id = d.watch_id AND f.model_id = d.model_id AND f.key = d.key;
    DELETE FROM imgembed.job WHERE id = ANY (v_owned) AND id = ANY (p_done_ids);
    -- Room in flight again: wake a dispatcher to refill the broker's queue.
    PERFORM imgembed._notify_jobs(cardinality(v_owned));

    -- Failures superseded by a newer pending job (the image changed meanwhile) are dropped.
    DELETE FROM imgembed.job j
     WHERE j.id = ANY (v_owned) AND j.id = ANY (p_failed_ids)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job j
       SET status = CASE WHEN f.retryable AND j.attempts < p_max_attempts THEN 'pending' ELSE 'failed' END,
           last_error = f.error,
           not_before = now() + make_interval(secs => p_backoff_seconds * power(2, greatest(j.attempts - 1, 0))),
           claim_id = NULL, lease_until = NULL, updated_at = now()
      FROM unnest(p_failed_ids, p_errors, p_retryable) AS f(job_id, error, retryable)
     WHERE j.id = f.job_id AND j.id = ANY (v_owned);
    RETURN v_written;
END $$;

-- Hand jobs of a claim back without spending an attempt: what stopped them was not about their
-- rows (the model could not be loaded, the forward pass failed, the device ran out of memory).
-- They wait p_delay_seconds; the reason stays in last_error. Returns how many were handed back.
CREATE OR REPLACE FUNCTION imgembed.requeue_claim(
    p_claim uuid,
    p_job_ids bigint[],
    p_reason text,
    p_delay_seconds double precision
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    -- A row that changed meanwhile already has its pending job: this one goes.
    DELETE FROM imgembed.job j
     WHERE j.claim_id = p_claim AND j.status = 'in_flight' AND j.id = ANY (p_job_ids)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', attempts = greatest(attempts - 1, 0), last_error = p_reason,
           not_before = now() + make_interval(secs => greatest(coalesce(p_delay_seconds, 0), 0)),
           claim_id = NULL, lease_until = NULL, updated_at = now()
     WHERE claim_id = p_claim AND status = 'in_flight' AND id = ANY (p_job_ids);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- Put failed jobs back in the queue (all, one table's, and/or those whose error contains
-- `reason`), with fresh attempts. Returns how many.
CREATE OR REPLACE FUNCTION imgembed.retry_failed(p_tbl regclass DEFAULT NULL, p_reason text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_watch_id integer := CASE WHEN p_tbl IS NULL THEN NULL ELSE (imgembed._watch_of(p_tbl)).id END;
    v_count integer;
BEGIN
    DELETE FROM imgembed.job j
     WHERE j.status = 'failed'
       AND (v_watch_id IS NULL OR j.watch_id = v_watch_id)
       AND (p_reason IS NULL OR strpos(j.last_error, p_reason) > 0)
       AND imgembed._superseded(j.watch_id, j.model_id, j.key);
    UPDATE imgembed.job
       SET status = 'pending', attempts = 0, not_before = now(), updated_at = now()
     WHERE status = 'failed' AND (v_watch_id IS NULL OR watch_id = v_watch_id)
       AND (p_reason IS NULL OR strpos(last_error, p_reason) > 0);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_count);
    RETURN v_count;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/50_status.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- What users look at: exact backlog per (table, model), failures, a row's stored vector.

CREATE OR REPLACE FUNCTION imgembed._status_rows()
RETURNS TABLE (
    table_name text,
    model text,
    is_default boolean,
    "rows" bigint,
    embedded bigint,
    pending bigint,
    in_flight bigint,
    failed bigint,
    oldest_pending_age interval,
    embedded_last_minute bigint,
    embedded_last_5_minutes bigint
)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link record;
BEGIN
    FOR v_link IN
        SELECT w.id AS watch_id, w.tbl, w.table_name, m.id AS model_id, m.name, wm.is_default, wm.storage_table,
               imgembed._has_image_sql(w, 's') AS has_image
          FROM imgembed.watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
          JOIN imgembed.model m ON m.id = wm.model_id
         ORDER BY w.table_name, m.name
    LOOP
        table_name := v_link.table_name;
        model := v_link.name;
        is_default := v_link.is_default;
        EXECUTE format('SELECT count(*) FROM %s s WHERE %s', v_link.tbl, v_link.has_image) INTO "rows";
        EXECUTE format('SELECT count(*), count(*) FILTER (WHERE embedded_at > now() - interval ''1 minute''),'
                       ' count(*) FILTER (WHERE embedded_at > now() - interval ''5 minutes'') FROM imgembed.%I',
                       v_link.storage_table)
           INTO embedded, embedded_last_minute, embedded_last_5_minutes;
        SELECT count(*) FILTER (WHERE j.status = 'pending'),
               count(*) FILTER (WHERE j.status = 'in_flight'),
               count(*) FILTER (WHERE j.status = 'failed'),
               now() - min(j.enqueued_at) FILTER (WHERE j.status = 'pending')
          INTO pending, in_flight, failed, oldest_pending_age
          FROM imgembed.job j
         WHERE j.watch_id = v_link.watch_id AND j.model_id = v_link.model_id;
        -- Keys still in the intake (not yet expanded into jobs) are pending too.
        SELECT pending + coalesce(sum(cardinality(i.keys)), 0),
               greatest(oldest_pending_age, now() - min(i.created_at))
          INTO pending, oldest_pending_age
          FROM imgembed.intake i
         WHERE i.watch_id = v_link.watch_id AND (i.model_id IS NULL OR i.model_id = v_link.model_id);
        RETURN NEXT;
    END LOOP;
END $$;

-- Per watched table and model: rows with an image, rows embedded, jobs pending / in flight /
-- failed, how long the oldest pending job has waited, and vectors written in the last 1 and 5
-- minutes (throughput). Counts are exact.
CREATE OR REPLACE VIEW imgembed.status AS
SELECT * FROM imgembed._status_rows();

-- Every failed job with its reason.
CREATE OR REPLACE VIEW imgembed.failures AS
SELECT w.table_name, j.key, m.name AS model, j.attempts, j.last_error, j.updated_at AS failed_at
  FROM imgembed.job j
  JOIN imgembed.watch w ON w.id = j.watch_id
  JOIN imgembed.model m ON m.id = j.model_id
 WHERE j.status = 'failed';

-- A row's stored vector (NULL while it is pending or when its image failed).
CREATE OR REPLACE FUNCTION imgembed.vector_of(tbl regclass, key anyelement, model text DEFAULT NULL)
RETURNS @vector@.vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN imgembed._stored_vector(v_watch, imgembed._watch_model_of(v_watch, model), key::text);
END $$;

-- Failures grouped by their reason (the error's text up to its first colon).
CREATE OR REPLACE VIEW imgembed.failure_reasons AS
SELECT f.table_name, f.model, split_part(f.last_error, ':', 1) AS reason, count(*) AS failures,
       max(f.failed_at) AS latest
  FROM imgembed.failures f
 GROUP BY 1, 2, 3;

-- Workers that reported in the last 30 seconds (they beat every 5 s while running).
-- `unavailable`: the models the worker cannot load now, as [{model, tower, reason, since}]; their
-- rows wait (they do not fail) until a worker loads them.
CREATE OR REPLACE VIEW imgembed.workers AS
SELECT h.worker, h.pid, h.device, h.models, h.batches, h.started_at, h.last_seen,
       h.last_seen > now() - interval '30 seconds' AS alive, h.unavailable
  FROM imgembed.worker_heartbeat h;

-- Models that live workers cannot load, one row per model and reason: what `imgembed status` shows.
CREATE OR REPLACE VIEW imgembed.unavailable_models AS
SELECT u->>'model' AS model, u->>'reason' AS reason, min((u->>'since')::timestamptz) AS since,
       array_agg(DISTINCT w.worker ORDER BY w.worker) AS workers
  FROM imgembed.workers w CROSS JOIN LATERAL jsonb_array_elements(w.unavailable) u
 WHERE w.alive
 GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION imgembed.worker_beat(
    p_worker text, p_pid integer, p_device text, p_models text[], p_batches bigint, p_unavailable jsonb
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO imgembed.worker_heartbeat AS h (worker, pid, device, models, batches, unavailable)
    VALUES (p_worker, p_pid, p_device, p_models, p_batches, coalesce(p_unavailable, '[]'))
    ON CONFLICT (worker) DO UPDATE
       SET pid = excluded.pid, device = excluded.device, models = excluded.models, batches = excluded.batches,
           unavailable = excluded.unavailable, last_seen = now();
    DELETE FROM imgembed.worker_heartbeat WHERE last_seen < now() - interval '1 day';
$$;

-- The name (in schema imgembed) of the table holding a watched table's vectors for a model
-- (default: the table's default model), for queries that read vectors directly.
CREATE OR REPLACE FUNCTION imgembed.storage_table(tbl regclass, model text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (imgembed._watch_model_of(imgembed._watch_of(tbl), model)).storage_table;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/60_search.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Nearest-neighbour search over a watched table's vectors: the shared core and similar().
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
-- Keyset pagination: rows after (p_after_distance, p_after_id) in (distance, key) order.
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
    p_after_id text DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql
SET hnsw.iterative_scan = 'strict_order'
AS $$
DECLARE
    v_dim integer;
    v_filter text := imgembed._filter_sql(p_watch, p_filter, 4);
    v_template text;
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
    IF @vector@.vector_dims(p_query) <> v_dim THEN
        RAISE EXCEPTION 'query vector has % dimensions but the model has %', @vector@.vector_dims(p_query), v_dim
            USING ERRCODE = 'data_exception';
    END IF;
    p_exact := p_exact OR v_dim > 4000;  -- no index above 4,000 dimensions (see _create_index)
    -- The first %%s below is the ORDER BY, the second the LIMIT; both are filled per path.
    v_template := format(
        'SELECT (array_agg(q.id ORDER BY q.d, q.id))[1:$2], (array_agg(q.d ORDER BY q.d, q.id))[1:$2] FROM ('
        ' SELECT e.id::text AS id, (e.embedding OPERATOR(@vector@.<=>) $1)::float8 AS d FROM imgembed.%1$I e %2$s'
        ' WHERE e.id::text <> ALL ($3) AND (%3$s) AND (%4$s) AND (%5$s) ORDER BY %%s LIMIT %%s) q',
        p_link.storage_table,
        CASE WHEN v_filter IS NULL AND p_condition IS NULL THEN ''
             ELSE format('JOIN %s s ON s.%I = e.id', p_watch.tbl, p_watch.key_column) END,
        coalesce(v_filter, 'true'),
        coalesce(p_condition, 'true'),
        CASE WHEN p_after_distance IS NULL THEN 'true'
             ELSE '(e.embedding OPERATOR(@vector@.<=>) $1) > $5 OR ((e.embedding OPERATOR(@vector@.<=>) $1) = $5 AND e.id::text > $6)' END);

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
        EXECUTE format(v_template, format('e.embedding::@vector@.halfvec(%1$s) OPERATOR(@vector@.<=>) $1::@vector@.halfvec(%1$s)', v_dim), '$2 * 2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_exact OR ((v_filter IS NOT NULL OR p_condition IS NOT NULL) AND coalesce(cardinality(v_ids), 0) < p_k) THEN
        -- "+ 0" keeps the planner off the index: an exact scan in (distance, key) order.
        EXECUTE format(v_template, '(e.embedding OPERATOR(@vector@.<=>) $1) + 0, e.id::text', '$2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    PERFORM set_config('hnsw.ef_search', coalesce(v_previous_ef, '40'), true);
    RETURN QUERY SELECT u.id, u.d FROM unnest(v_ids, v_distances) WITH ORDINALITY AS u(id, d, n) ORDER BY u.n;
END $$;

-- The k images most similar to one row (itself excluded), nearest first. Keys keep their type.
CREATE OR REPLACE FUNCTION imgembed.similar(
    tbl regclass,
    key anyelement,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anyelement DEFAULT NULL
) RETURNS TABLE (id anyelement, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed._knn($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9, $10) r',
        pg_typeof(key))
    USING v_watch, v_link, imgembed._require_vector(v_watch, v_link, key::text), k, ARRAY[key::text],
          filter, exact, ef_search, after_distance, after_id::text;
END $$;

-- The k rows nearest to any vector of the model's dimension. Keys come back as text; the
-- overload with a key_type argument (e.g. NULL::bigint) returns them in that type.
CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, imgembed._watch_model_of(v_watch, model), vec, k, '{}', filter, NULL, exact, ef_search,
        after_distance, after_id) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    key_type anyelement,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL
) RETURNS TABLE (id anyelement, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.similar_to_vector($1, $2, $3, $4, $5, $6, $7, $8, $9) r',
        pg_typeof(key_type))
    USING tbl, vec, k, model, filter, ef_search, exact, after_distance, after_id;
END $$;

-- Pairs of rows whose images are near-identical (cosine distance <= max_distance), each pair once.
-- Each row's per_item nearest neighbours are examined (HNSW), so a group larger than per_item
-- identical images yields only part of its pairs: raise per_item for such data.
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/61_text.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Text is data too: queries (imgembed.text_query) and label prompts (imgembed.label_prompt) are
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/62_labels.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Labels from labelled neighbours (kNN: face banks, few-shot) and the predicted_labels view.
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

CREATE OR REPLACE FUNCTION imgembed._predicted_labels(p_k integer DEFAULT 5)
RETURNS TABLE (table_name text, key text, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
    v_link imgembed.watch_model;
    v_key text;
    v_vector @vector@.vector;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed.watch w WHERE w.label_column IS NOT NULL ORDER BY w.table_name LOOP
        SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = v_watch.id AND wm.is_default;
        CONTINUE WHEN NOT FOUND;
        FOR v_key, v_vector IN EXECUTE format(
            'SELECT e.id::text, e.embedding FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE s.%I IS NULL ORDER BY 1',
            v_link.storage_table, v_watch.tbl, v_watch.key_column, v_watch.label_column)
        LOOP
            table_name := v_watch.table_name;
            key := v_key;
            SELECT m.name INTO model FROM imgembed.model m WHERE m.id = v_link.model_id;
            SELECT v.label, v.confidence INTO label, confidence
              FROM imgembed._vote(v_watch, v_link, v_vector, p_k, ARRAY[v_key], false) v LIMIT 1;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END $$;

-- Every embedded, unlabelled row of every watched table with a label column, with the label its
-- 5 nearest labelled neighbours vote for (NULL when no row is labelled yet).
CREATE OR REPLACE VIEW imgembed.predicted_labels AS
SELECT * FROM imgembed._predicted_labels(5);

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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/63_recommend.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Visual recommendations: near what a user liked, away from what they disliked.

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
    p_exact boolean
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
        p_k, p_exclude, p_filter, NULL, p_exact) r;
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
    exact boolean DEFAULT false
) RETURNS TABLE (id anyelement, score double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_positives text[] := ARRAY(SELECT DISTINCT p::text FROM unnest(positives) p WHERE p IS NOT NULL);
    v_negatives text[] := ARRAY(SELECT DISTINCT n::text FROM unnest(negatives) n WHERE n IS NOT NULL);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.score FROM imgembed._recommend($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) r',
        pg_typeof(positives[array_lower(positives, 1)]))
    USING v_watch, imgembed._watch_model_of(v_watch, model),
          v_positives, array_fill(1.0 / greatest(cardinality(v_positives), 1), ARRAY[cardinality(v_positives)]),
          v_negatives, array_fill(-0.5 / greatest(cardinality(v_negatives), 1), ARRAY[cardinality(v_negatives)]),
          v_positives || v_negatives, k, filter, exact;
END $$;

-- Recommendations from imgembed.interaction: positive weights are likes, negative weights
-- dislikes (each side normalised, dislikes count half); every item the user already interacted
-- with is excluded. Keys come back as text.
CREATE OR REPLACE FUNCTION imgembed.recommend_for_user(
    tbl regclass,
    user_id text,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL
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
        v_negatives, v_negative_weights, v_seen, k, filter, false) r;
END $$;

-- The same without negatives.
CREATE OR REPLACE FUNCTION imgembed.recommend(
    tbl regclass,
    positives anyarray,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    exact boolean DEFAULT false
) RETURNS TABLE (id anyelement, score double precision)
LANGUAGE sql AS $$
    SELECT * FROM imgembed.recommend(tbl, positives, positives[1:0], k, model, filter, exact)
$$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/70_models.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Model lifecycle per watched table: backfill a new model beside the current one (add_model, in
-- 20_watch.sql), switch the default atomically once it is complete, drop the old one.

-- Rows still to embed for (table, model), queued or running: a backfill is complete at 0.
CREATE OR REPLACE FUNCTION imgembed._unfinished_jobs(p_watch_id integer, p_model_id integer)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM imgembed.job
             WHERE watch_id = p_watch_id AND model_id = p_model_id AND status IN ('pending', 'in_flight'))
         + (SELECT coalesce(sum(cardinality(keys)), 0) FROM imgembed.intake
             WHERE watch_id = p_watch_id AND (model_id IS NULL OR model_id = p_model_id))
$$;

-- Make `model` the table's default: queries without a model use it from the next statement on.
-- Refused while its backfill is incomplete, unless force.
CREATE OR REPLACE FUNCTION imgembed.use_model(tbl regclass, model text, force boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_unfinished bigint := imgembed._unfinished_jobs(v_watch.id, v_link.model_id);
BEGIN
    IF v_unfinished > 0 AND NOT force THEN
        RAISE EXCEPTION 'model % is still backfilling table % (% rows to go)', model, v_watch.table_name, v_unfinished
            USING HINT = 'wait for it (imgembed models add --wait, or imgembed.status), or pass force => true',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Lock the table's links so concurrent switches serialise; two updates keep the
    -- one-default-per-table index satisfied at every step.
    PERFORM 1 FROM imgembed.watch_model WHERE watch_id = v_watch.id FOR UPDATE;
    UPDATE imgembed.watch_model SET is_default = false WHERE watch_id = v_watch.id AND is_default;
    UPDATE imgembed.watch_model SET is_default = true WHERE watch_id = v_watch.id AND model_id = v_link.model_id;
END $$;

-- Stop embedding a table with `model`: its vectors, index and jobs go. The default cannot be
-- dropped: switch first with use_model().
CREATE OR REPLACE FUNCTION imgembed.drop_model(tbl regclass, model text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    IF v_link.is_default THEN
        RAISE EXCEPTION 'model % is the default of table %', model, v_watch.table_name
            USING HINT = 'make another model the default first: imgembed.use_model(table, other_model)',
                  ERRCODE = 'object_in_use';
    END IF;
    PERFORM imgembed._delete_jobs(v_watch.id, v_link.model_id);
    EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_link.storage_table);
    DELETE FROM imgembed.watch_model WHERE watch_id = v_watch.id AND model_id = v_link.model_id;
END $$;

-- Remove a model everywhere (its vectors on every table, and the registry row). Refused while it
-- is the default of some table.
CREATE OR REPLACE FUNCTION imgembed.forget_model(model text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model := imgembed._model_named(model);
    v_table regclass;
BEGIN
    SELECT w.tbl INTO v_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
     WHERE wm.model_id = v_model.id AND wm.is_default AND w.text_column IS NULL LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'model % is still the default of table %', model, v_table
            USING HINT = 'switch that table to another model first with imgembed.use_model()',
                  ERRCODE = 'object_in_use';
    END IF;
    FOR v_table IN
        SELECT w.tbl FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id WHERE wm.model_id = v_model.id
    LOOP
        -- On text tables the default follows the image tables: hand it to another model, if any.
        UPDATE imgembed.watch_model SET is_default = false
         WHERE model_id = v_model.id AND watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table);
        UPDATE imgembed.watch_model SET is_default = true
         WHERE (watch_id, model_id) = (
             SELECT o.watch_id, min(o.model_id) FROM imgembed.watch_model o
              WHERE o.watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table) AND o.model_id <> v_model.id
              GROUP BY o.watch_id)
           AND NOT EXISTS (SELECT 1 FROM imgembed.watch_model d
                            WHERE d.watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table) AND d.is_default);
        PERFORM imgembed.drop_model(v_table, model);
    END LOOP;
    DELETE FROM imgembed.model WHERE id = v_model.id;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/80_clusters.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Clustering runs: requested in SQL, performed by a worker (scikit-learn), results in SQL.

-- Ask for a clustering of a table's vectors: k clusters, or k chosen by silhouette when NULL.
-- Returns the run id; imgembed.cluster_run shows its status.
CREATE OR REPLACE FUNCTION imgembed.cluster(
    tbl regclass,
    k integer DEFAULT NULL,
    method text DEFAULT 'kmeans',
    model text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_run bigint;
BEGIN
    IF method NOT IN ('kmeans', 'minibatch_kmeans', 'hdbscan') THEN
        RAISE EXCEPTION 'unknown clustering method %', method
            USING HINT = 'use kmeans, minibatch_kmeans or hdbscan', ERRCODE = 'invalid_parameter_value';
    END IF;
    IF k IS NOT NULL AND k < 2 THEN
        RAISE EXCEPTION 'k must be at least 2, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO imgembed.cluster_run (watch_id, model_id, method, k_requested)
    VALUES (v_watch.id, v_link.model_id, method, k) RETURNING id INTO v_run;
    PERFORM imgembed._notify_jobs(1);
    RETURN v_run;
END $$;

-- A dispatcher takes the oldest pending run (or one whose worker died), or NULL.
CREATE OR REPLACE FUNCTION imgembed.claim_cluster_run(p_lease_seconds double precision, p_max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_run bigint;
BEGIN
    UPDATE imgembed.cluster_run
       SET status = 'failed', error = format('worker lost: lease expired %s times', attempts), finished_at = now()
     WHERE status = 'running' AND lease_until < now() AND attempts >= p_max_attempts;
    UPDATE imgembed.cluster_run r
       SET status = 'running', attempts = r.attempts + 1,
           lease_until = now() + make_interval(secs => p_lease_seconds)
     WHERE r.id = (SELECT c.id FROM imgembed.cluster_run c
                    WHERE c.status = 'pending' OR (c.status = 'running' AND c.lease_until < now())
                    ORDER BY c.id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING r.id INTO v_run;
    RETURN v_run;
END $$;

-- What a run asks for: (method, k requested).
CREATE OR REPLACE FUNCTION imgembed.cluster_run_spec(p_run_id bigint)
RETURNS TABLE (method text, k_requested integer)
LANGUAGE sql STABLE AS $$
    SELECT r.method, r.k_requested FROM imgembed.cluster_run r WHERE r.id = p_run_id
$$;

-- The vectors a run clusters: (key, vector) of every embedded row.
CREATE OR REPLACE FUNCTION imgembed.cluster_input(p_run_id bigint)
RETURNS TABLE (key text, embedding @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_storage text;
BEGIN
    SELECT wm.storage_table INTO v_storage FROM imgembed.cluster_run r
      JOIN imgembed.watch_model wm ON wm.watch_id = r.watch_id AND wm.model_id = r.model_id
     WHERE r.id = p_run_id;
    IF v_storage IS NULL THEN
        RAISE EXCEPTION 'cluster run % has no vectors to read (model detached?)', p_run_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format('SELECT e.id::text, e.embedding FROM imgembed.%I e ORDER BY 1', v_storage);
END $$;

-- Store a run's result in one transaction (a rerun of the same run replaces it).
CREATE OR REPLACE FUNCTION imgembed.finish_cluster_run(
    p_run_id bigint,
    p_k integer,
    p_quality double precision,
    p_keys text[],
    p_clusters integer[],
    p_distances double precision[],
    p_centre_clusters integer[],
    p_centres text[],
    p_sizes integer[],
    p_medoids text[],
    p_params jsonb DEFAULT '{}'
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM imgembed.cluster_member WHERE run_id = p_run_id;
    DELETE FROM imgembed.cluster_centre WHERE run_id = p_run_id;
    INSERT INTO imgembed.cluster_member (run_id, key, cluster, distance)
    SELECT p_run_id, m.key, m.cluster, m.distance FROM unnest(p_keys, p_clusters, p_distances) AS m(key, cluster, distance);
    INSERT INTO imgembed.cluster_centre (run_id, cluster, centre, size, medoid_key)
    SELECT p_run_id, c.cluster, c.centre, c.size, c.medoid
      FROM unnest(p_centre_clusters, p_centres, p_sizes, p_medoids) AS c(cluster, centre, size, medoid);
    UPDATE imgembed.cluster_run
       SET status = 'done', k = p_k, quality = p_quality, params = params || p_params, error = NULL,
           finished_at = now(), lease_until = NULL
     WHERE id = p_run_id;
END $$;

CREATE OR REPLACE FUNCTION imgembed.fail_cluster_run(p_run_id bigint, p_error text)
RETURNS void
LANGUAGE sql AS $$
    UPDATE imgembed.cluster_run SET status = 'failed', error = p_error, finished_at = now(), lease_until = NULL
     WHERE id = p_run_id
$$;

CREATE OR REPLACE FUNCTION imgembed._cluster_summary()
RETURNS TABLE (run_id bigint, table_name text, model text, method text, cluster integer, size integer,
               medoid_key text, label_mix jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run record;
BEGIN
    FOR v_run IN
        SELECT r.id, w.*, m.name AS model_name, r.method AS run_method
          FROM imgembed.cluster_run r JOIN imgembed.watch w ON w.id = r.watch_id JOIN imgembed.model m ON m.id = r.model_id
         WHERE r.status = 'done' ORDER BY r.id
    LOOP
        RETURN QUERY EXECUTE format(
            'SELECT c.run_id, $2, $3, $4, c.cluster, c.size, c.medoid_key, %s'
            '  FROM imgembed.cluster_centre c WHERE c.run_id = $1 ORDER BY c.cluster',
            CASE WHEN v_run.label_column IS NULL THEN 'NULL::jsonb'
                 ELSE format('(SELECT jsonb_object_agg(coalesce(x.label, ''(none)''), x.n) FROM ('
                             ' SELECT s.%I::text AS label, count(*) AS n FROM imgembed.cluster_member mm'
                             ' JOIN %s s ON s.%I = mm.key::%s WHERE mm.run_id = c.run_id AND mm.cluster = c.cluster'
                             ' GROUP BY 1) x)', v_run.label_column, v_run.tbl, v_run.key_column, v_run.key_type) END)
        USING v_run.id, v_run.table_name, v_run.model_name, v_run.run_method;
    END LOOP;
END $$;

-- One row per cluster of every finished run: size, most central row, and the labels inside it.
CREATE OR REPLACE VIEW imgembed.cluster_summary AS
SELECT * FROM imgembed._cluster_summary();

-- The cluster a row belongs to by its nearest centre (latest finished run unless one is named),
-- so rows inserted after a run get a cluster without waiting for a new run.
CREATE OR REPLACE FUNCTION imgembed.nearest_cluster(tbl regclass, key anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, cluster integer, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_run imgembed.cluster_run;
    v_link imgembed.watch_model;
BEGIN
    SELECT * INTO v_run FROM imgembed.cluster_run r
     WHERE r.watch_id = v_watch.id AND r.status = 'done' AND (nearest_cluster.run_id IS NULL OR r.id = nearest_cluster.run_id)
     ORDER BY r.id DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no finished clustering run', v_watch.table_name
            USING HINT = 'run SELECT imgembed.cluster(table) and let a worker finish it', ERRCODE = 'no_data_found';
    END IF;
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = v_watch.id AND wm.model_id = v_run.model_id;
    RETURN QUERY
    SELECT v_run.id, c.cluster, (c.centre::@vector@.vector OPERATOR(@vector@.<=>) imgembed._require_vector(v_watch, v_link, key::text))::float8 AS d
      FROM imgembed.cluster_centre c WHERE c.run_id = v_run.id ORDER BY 3 LIMIT 1;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/81_anomalies.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Anomaly scores from known-good examples only (quality control): a row's score is its mean
-- cosine distance to the k nearest known-good rows; a threshold per (table, model) is calibrated
-- from the good rows' own leave-one-out scores.

-- Declare which rows are known good: a boolean column, or a value of the table's label column.
CREATE OR REPLACE FUNCTION imgembed.set_known_good(tbl regclass, good_column text DEFAULT NULL, good_label text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_type text;
BEGIN
    IF num_nonnulls(good_column, good_label) <> 1 THEN
        RAISE EXCEPTION 'give exactly one of good_column (a boolean column) or good_label (a label value)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF good_column IS NOT NULL THEN
        SELECT format_type(atttypid, NULL) INTO v_type FROM pg_attribute
         WHERE attrelid = tbl AND attname = good_column AND attnum > 0 AND NOT attisdropped;
        IF v_type IS DISTINCT FROM 'boolean' THEN
            RAISE EXCEPTION 'good_column "%" must be a boolean column of %', good_column, v_watch.table_name
                USING ERRCODE = 'datatype_mismatch';
        END IF;
    ELSIF v_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column for good_label', v_watch.table_name
            USING HINT = 'watch it with label_column => ..., or use good_column', ERRCODE = 'undefined_column';
    END IF;
    UPDATE imgembed.watch w SET good_column = set_known_good.good_column, good_label = set_known_good.good_label
     WHERE w.id = v_watch.id;
END $$;

-- SQL condition (source alias s): the row is known good.
CREATE OR REPLACE FUNCTION imgembed._good_sql(p_watch imgembed.watch)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_watch.good_column IS NOT NULL THEN
        RETURN format('s.%I IS TRUE', p_watch.good_column);
    ELSIF p_watch.good_label IS NOT NULL THEN
        RETURN format('s.%I::text = %L', p_watch.label_column, p_watch.good_label);
    END IF;
    RAISE EXCEPTION 'table % has no known-good rows declared', p_watch.table_name
        USING HINT = 'call imgembed.set_known_good(table, good_column => ... or good_label => ...)',
              ERRCODE = 'object_not_in_prerequisite_state';
END $$;

CREATE OR REPLACE FUNCTION imgembed._anomaly_score(
    p_watch imgembed.watch, p_link imgembed.watch_model, p_key text, p_vector @vector@.vector, p_k integer, p_exact boolean
) RETURNS double precision
LANGUAGE sql AS $$
    SELECT avg(n.distance)
      FROM imgembed._knn(p_watch, p_link, p_vector, p_k, ARRAY[p_key], NULL, imgembed._good_sql(p_watch), p_exact) n
$$;

-- Mean cosine distance from one row to its k nearest known-good rows (itself excluded).
CREATE OR REPLACE FUNCTION imgembed.anomaly_score(
    tbl regclass, key anyelement, k integer DEFAULT 5, model text DEFAULT NULL, exact boolean DEFAULT false
) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN imgembed._anomaly_score(v_watch, v_link, key::text, imgembed._require_vector(v_watch, v_link, key::text), k, exact);
END $$;

-- Calibrate the threshold: the given quantile of the good rows' leave-one-out scores. Stored per
-- (table, model) and returned.
CREATE OR REPLACE FUNCTION imgembed.calibrate_anomalies(
    tbl regclass, quantile double precision DEFAULT 0.99, k integer DEFAULT 5, model text DEFAULT NULL
) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_scores double precision[];
    v_threshold double precision;
BEGIN
    IF quantile IS NULL OR quantile <= 0 OR quantile > 1 THEN
        RAISE EXCEPTION 'quantile must be in (0, 1], got %', quantile USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('SELECT array_agg(imgembed._anomaly_score($1, $2, e.id::text, e.embedding, $3, true))'
                   '  FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE %s',
                   v_link.storage_table, v_watch.tbl, v_watch.key_column, imgembed._good_sql(v_watch))
       INTO v_scores USING v_watch, v_link, k;
    IF coalesce(cardinality(v_scores), 0) < 2 THEN
        RAISE EXCEPTION 'table % needs at least 2 embedded known-good rows to calibrate', v_watch.table_name
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT percentile_cont(quantile) WITHIN GROUP (ORDER BY s) INTO v_threshold FROM unnest(v_scores) s;
    INSERT INTO imgembed.anomaly_threshold (watch_id, model_id, k, quantile, threshold, good_rows)
    VALUES (v_watch.id, v_link.model_id, k, quantile, v_threshold, cardinality(v_scores))
    ON CONFLICT (watch_id, model_id) DO UPDATE
       SET k = excluded.k, quantile = excluded.quantile, threshold = excluded.threshold,
           good_rows = excluded.good_rows, calibrated_at = now();
    RETURN v_threshold;
END $$;

CREATE OR REPLACE FUNCTION imgembed._anomalies()
RETURNS TABLE (table_name text, key text, model text, score double precision, threshold double precision,
               is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_link imgembed.watch_model;
    v_limit imgembed.anomaly_threshold;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed.watch w WHERE num_nonnulls(w.good_column, w.good_label) = 1 ORDER BY w.table_name LOOP
        SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = v_watch.id AND wm.is_default;
        SELECT * INTO v_limit FROM imgembed.anomaly_threshold t WHERE t.watch_id = v_watch.id AND t.model_id = v_link.model_id;
        CONTINUE WHEN v_limit IS NULL;
        RETURN QUERY EXECUTE format(
            'SELECT $4, x.id, m.name, x.score, $5, x.score > $5 FROM ('
            '  SELECT e.id::text AS id, imgembed._anomaly_score($1, $2, e.id::text, e.embedding, $3, false) AS score'
            '    FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE NOT coalesce(%s, false)) x'
            '  CROSS JOIN imgembed.model m WHERE m.id = $6 ORDER BY x.score DESC',
            v_link.storage_table, v_watch.tbl, v_watch.key_column, imgembed._good_sql(v_watch))
        USING v_watch, v_link, v_limit.k, v_watch.table_name, v_limit.threshold, v_link.model_id;
    END LOOP;
END $$;

-- Every row not marked good, in every table with known-good rows and a calibrated threshold:
-- its score and whether it is over the threshold. Highest scores first.
CREATE OR REPLACE VIEW imgembed.anomalies AS
SELECT * FROM imgembed._anomalies();
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/90_pin_search_path.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Pin the search_path of every imgembed function (applied last by each migration): objects resolve
-- to pg_catalog, imgembed and the schema holding pgvector, never to what a caller put first.
DO $$
DECLARE
    v_vector_schema text;
    v_function regprocedure;
BEGIN
    SELECT n.nspname INTO v_vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, imgembed, pg_temp',
                       v_function, v_vector_schema);
    END LOOP;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/95_roles.sql as released with revision 0004
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Roles and privileges (least privilege).
--   imgembed_reader: search functions and views; changes nothing (request_text excepted: it
--                    queues a text, through a SECURITY DEFINER function).
--   imgembed_worker: claims jobs, reads the claimed rows' image columns, writes vectors, all
--                    through SECURITY DEFINER functions; no direct access to any table.
-- The application's own role keeps its rights. SECURITY DEFINER functions run as the role that
-- ran the migration: run migrations as the database's owner role, not as a superuser.
-- Roles belong to the whole cluster: created here when the migrating role may (CREATEROLE);
-- otherwise a NOTICE says what a DBA must run.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['imgembed_reader', 'imgembed_worker'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'imgembed: cannot create role % (ask a DBA: CREATE ROLE % NOLOGIN;) then rerun imgembed migrate',
                    v_role, v_role;
            END;
        END IF;
    END LOOP;
END $$;

-- Functions the worker and dispatcher call run as their owner; nobody else may call them.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN ('expand_intake', 'claim_batch', 'start_claim', 'release_claim', 'recover_expired', 'in_flight_count',
                             'claimed_images', 'finish_batch', 'requeue_claim', 'claim_cluster_run', 'cluster_run_spec',
                             'cluster_input',
                             'finish_cluster_run', 'fail_cluster_run', 'worker_beat')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO imgembed_worker', v_function);
        END IF;
    END LOOP;
    -- Readers may queue a text for search_text, nothing else.
    ALTER FUNCTION imgembed.request_text(text) SECURITY DEFINER;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA imgembed TO imgembed_reader;
        REVOKE SELECT ON imgembed.alembic_version FROM imgembed_reader;
    END IF;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- This database's loopback login of search_text.
DO $$
DECLARE
    v_role text := (SELECT s.value FROM imgembed.private_setting s WHERE s.name = 'text_request_role');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
        EXECUTE format('REVOKE ALL ON FUNCTION imgembed.request_text(text) FROM %I', v_role);
        EXECUTE format('REVOKE ALL ON SCHEMA imgembed FROM %I', v_role);
        BEGIN
            EXECUTE format('DROP ROLE %I', v_role);
        EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
            RAISE NOTICE 'imgembed: role % kept (%)', v_role, SQLERRM;
        END;
    END IF;
END $$;

DROP FUNCTION IF EXISTS imgembed._secure_storage(imgembed.watch, text);
DROP FUNCTION IF EXISTS imgembed._table_readable(integer);
DROP FUNCTION IF EXISTS imgembed._row_visible(integer, text);
DROP FUNCTION IF EXISTS imgembed._text_state(text, text);
DROP FUNCTION IF EXISTS imgembed._conninfo_value(text);
DROP FUNCTION IF EXISTS imgembed.model_checksum(text);
DROP FUNCTION IF EXISTS imgembed._text_request_role();
DROP TABLE IF EXISTS imgembed.private_setting;
ALTER TABLE imgembed.interaction DROP COLUMN IF EXISTS role_name;

