-- Catalog helpers: models, watched tables, names of per-(table, model) vector tables.
-- Every function here is (re)pinned to a fixed search_path by 90_pin_search_path.sql.

-- The watch row of a table as it is named now, or a clear error when the table is not watched
-- (or changed so that the watch cannot follow: imgembed.watch_problems).
CREATE OR REPLACE FUNCTION imgembed._watch_of(p_tbl regclass)
RETURNS imgembed.watch
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE tbl = p_tbl;
    IF FOUND THEN
        RETURN v_watch;
    END IF;
    SELECT * INTO v_watch FROM imgembed.watch WHERE tbl = p_tbl;
    IF FOUND THEN
        RAISE EXCEPTION 'table % changed since it was watched: %', p_tbl, imgembed._watch_problem(v_watch)
            USING HINT = 'imgembed doctor --fix (or SELECT * FROM imgembed.repair_watches()) repairs the watch',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RAISE EXCEPTION 'table % is not watched by imgembed', p_tbl
        USING HINT = 'call imgembed.watch(''schema.table'', ''image_column'') first',
              ERRCODE = 'undefined_object';
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

-- Register (or confirm) a model. Its name is what workers load: `imgembed-tiny`, `ARCH:TAG`,
-- `ARCH:/path/to/checkpoint` or `timm:ARCH.TAG`. The dimension must match what the model outputs.
-- p_text_tower: whether it embeds texts too (CLIP models), or images only (timm's).
CREATE OR REPLACE FUNCTION imgembed.register_model(
    p_name text,
    p_architecture text,
    p_pretrained text,
    p_dim integer,
    p_sha256 text DEFAULT NULL,
    p_make_default boolean DEFAULT false,
    p_text_tower boolean DEFAULT true
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model;
    v_watch imgembed.watch;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'model name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One registration at a time (until this transaction ends): two `imgembed migrate` started
    -- together both register the configured model, and both would insert it.
    PERFORM pg_advisory_xact_lock(hashtext('imgembed.register_model'));
    SELECT * INTO v_model FROM imgembed.model WHERE name = p_name;
    IF FOUND THEN
        IF v_model.dim <> p_dim THEN
            RAISE EXCEPTION 'model % is registered with dimension %, not %', p_name, v_model.dim, p_dim
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE imgembed.model SET sha256 = coalesce(p_sha256, sha256) WHERE id = v_model.id;
    ELSE
        INSERT INTO imgembed.model (name, architecture, pretrained, sha256, dim, text_tower)
        VALUES (p_name, p_architecture, p_pretrained, p_sha256, p_dim, coalesce(p_text_tower, true))
        RETURNING * INTO v_model;
    END IF;

    IF p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.model WHERE is_default) THEN
        UPDATE imgembed.model SET is_default = false WHERE is_default AND id <> v_model.id;
        UPDATE imgembed.model SET is_default = true WHERE id = v_model.id;
        -- Watched tables that have no model yet (e.g. imgembed.image after migrating) start now.
        FOR v_watch IN
            SELECT w.* FROM imgembed._live_watch w
             WHERE NOT EXISTS (SELECT 1 FROM imgembed.watch_model wm WHERE wm.watch_id = w.id)
        LOOP
            PERFORM imgembed._attach_model(v_watch, v_model, true);
        END LOOP;
    END IF;
    RETURN v_model.id;
END $$;

-- A model that embeds texts (a CLIP model), or a clear error naming what to use instead.
CREATE OR REPLACE FUNCTION imgembed._require_text_model(p_model text)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM imgembed.model m WHERE m.name = p_model AND NOT m.text_tower) THEN
        RAISE EXCEPTION 'model % embeds images only (no text tower): texts need a CLIP model', p_model
            USING HINT = 'attach one and name it: imgembed.add_model(table, ''ViT-B-32:laion2b_s34b_b79k''), '
                         'then model => ''ViT-B-32:laion2b_s34b_b79k''',
                  ERRCODE = 'feature_not_supported';
    END IF;
END $$;

-- imgembed's own query tables: texts to search with, label prompts and query images. Every model
-- an image table uses embeds them too; they are not image tables of their own.
CREATE OR REPLACE FUNCTION imgembed._query_tables()
RETURNS regclass[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY['imgembed.text_query'::regclass, 'imgembed.label_prompt'::regclass, 'imgembed.image_query'::regclass]
$$;

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

-- Whether the calling role may read the watched table (SELECT on it). Runs as the caller.
CREATE OR REPLACE FUNCTION imgembed._table_readable(p_watch_id integer)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT has_table_privilege(w.tbl, 'SELECT') FROM imgembed._live_watch w WHERE w.id = p_watch_id),
                    false)
$$;

-- Whether row-level security filters the watched table's rows for the calling role: then imgembed's
-- own rows that name rows of it (jobs, keys written) show the role only those it may read.
CREATE OR REPLACE FUNCTION imgembed._rows_filtered(p_watch_id integer)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT row_security_active(w.tbl) FROM imgembed._live_watch w WHERE w.id = p_watch_id), true)
$$;

-- Whether the calling role sees this row of the watched table (privileges and row-level security).
CREATE OR REPLACE FUNCTION imgembed._row_visible(p_watch_id integer, p_key text)
RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
    v_visible boolean;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = p_watch_id;
    IF NOT FOUND OR NOT has_table_privilege(v_watch.tbl, 'SELECT') THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s s WHERE s.%I = $1::%s)', v_watch.tbl, v_watch.key_column,
                   v_watch.key_type)
       INTO v_visible USING p_key;
    RETURN v_visible;
END $$;

-- The login of search_text's loopback connection in this database: roles belong to the whole
-- cluster, and each database migrated has its own, with its own password, named after the
-- database it was made for (a copy of the database, made with CREATE DATABASE ... TEMPLATE or
-- restored from a dump, keeps using it).
CREATE OR REPLACE FUNCTION imgembed._text_request_role()
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT s.value FROM imgembed.private_setting s WHERE s.name = 'text_request_role'),
                    (SELECT 'imgembed_text_' || d.oid FROM pg_database d WHERE d.datname = current_database()))
$$;
