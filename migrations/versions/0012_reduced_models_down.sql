-- Revision 0012, downgrade: back to revision 0011. Reduced models (their vectors, fits and
-- registrations) go with imgembed.model.derived_from, and revision 0011's definitions (sql/ as
-- released with it) are applied again.
DO $$
DECLARE
    v_link record;
    v_function regprocedure;
BEGIN
    FOR v_link IN
        SELECT wm.watch_id, wm.model_id, wm.storage_table FROM imgembed.watch_model wm
          JOIN imgembed.model m ON m.id = wm.model_id WHERE m.derived_from IS NOT NULL ORDER BY wm.storage_table
    LOOP
        IF EXISTS (SELECT 1 FROM imgembed.watch_model d WHERE d.watch_id = v_link.watch_id AND d.model_id = v_link.model_id
                                                             AND d.is_default) THEN
            -- The table's searches go back to the model the reduced one projected.
            UPDATE imgembed.watch_model SET is_default = false WHERE watch_id = v_link.watch_id AND is_default;
            UPDATE imgembed.watch_model SET is_default = true
             WHERE watch_id = v_link.watch_id
               AND model_id = (SELECT m.derived_from FROM imgembed.model m WHERE m.id = v_link.model_id);
        END IF;
        EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_link.storage_table);
        DELETE FROM imgembed.watch_model WHERE watch_id = v_link.watch_id AND model_id = v_link.model_id;
    END LOOP;
    FOR v_function IN SELECT p.oid::regprocedure FROM pg_proc p
                       WHERE p.pronamespace = 'imgembed'::regnamespace
                         AND p.proname IN ('_project', '_reduction_source', '_write_projections_sql', '_fill_reduced',
                                           '_project_written', 'reduce', 'claim_reduction', 'reduction_spec',
                                           'reduction_input', 'finish_reduction', 'fail_reduction')
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;
DROP VIEW IF EXISTS imgembed.reductions;
DROP TABLE imgembed.reduction_axis;
DROP TABLE imgembed.reduction;
DELETE FROM imgembed.model WHERE derived_from IS NOT NULL;
ALTER TABLE imgembed.model DROP COLUMN derived_from;
-- sql/05_optional_extensions.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- dblink lets search_text() enqueue a never-seen text in a transaction of its own (see
-- imgembed._request_text_elsewhere). It is optional: without it search_text asks the caller to
-- run imgembed.request_text() first. It opens connections, and every role may call its functions
-- where it is installed, so imgembed keeps it in a schema of its own that no other role may use:
-- installed there when the migrating role may, moved there when that role installed it elsewhere.
DO $$
DECLARE
    v_schema text;
    v_owned boolean;
BEGIN
    SELECT n.nspname, e.extowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
      INTO v_schema, v_owned
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink';
    IF v_schema = 'imgembed_dblink' THEN
        RETURN;
    END IF;
    BEGIN
        CREATE SCHEMA IF NOT EXISTS imgembed_dblink;
        REVOKE ALL ON SCHEMA imgembed_dblink FROM PUBLIC;
        IF v_schema IS NULL THEN
            CREATE EXTENSION dblink SCHEMA imgembed_dblink;
        ELSIF v_owned THEN
            ALTER EXTENSION dblink SET SCHEMA imgembed_dblink;
        ELSE
            RAISE NOTICE 'imgembed: dblink lives in schema %, where every role with USAGE on it may open connections '
                         'with it; a DBA may move it: ALTER EXTENSION dblink SET SCHEMA imgembed_dblink;', v_schema;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'imgembed: dblink not installed (%); search_text needs request_text() first. A DBA may run: '
                     'CREATE SCHEMA imgembed_dblink AUTHORIZATION %I; CREATE EXTENSION dblink SCHEMA imgembed_dblink;',
                     SQLERRM, current_user;
    END;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/07_partitions.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Partitioned tables. A write fires the statement triggers of the table it names only: the parent's
-- for rows routed through it, a partition's for rows written into the partition directly. So the
-- watch's triggers sit on every table of the partition tree (each level), and follow the tree:
-- partitions created or attached later get them (and attached rows are embedded), detached ones
-- lose them (and their rows' vectors go). A TRUNCATE of one partition forgets that partition's rows.

-- Every table of a watched table's partition tree but the watched table itself (none when it is
-- not partitioned).
CREATE OR REPLACE FUNCTION imgembed._partitions(p_tbl regclass)
RETURNS SETOF regclass
LANGUAGE sql STABLE AS $$
    SELECT t.relid FROM pg_partition_tree(p_tbl) t WHERE t.relid <> p_tbl
$$;

-- The watch's triggers on one table of its tree (again: CREATE OR REPLACE). A watch of replicated
-- rows (watch(..., replicated => true)) has more: the apply worker of a logical replication
-- subscription runs as a replica session (session_replication_role = replica), which fires only
-- triggers enabled ALWAYS or REPLICA, and row triggers only. So its TRUNCATE trigger fires ALWAYS
-- and each table holding rows (not a partitioned parent) gets a row trigger that fires in replica
-- sessions alone: local writes keep the statement triggers, rows applied by a subscription (and
-- its initial copy) go through the row trigger.
CREATE OR REPLACE FUNCTION imgembed._install_triggers(p_watch_id integer, p_rel regclass, p_partition boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_replicated boolean := coalesce((SELECT w.replicated FROM imgembed.watch w WHERE w.id = p_watch_id), false);
BEGIN
    EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS imgembed_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_insert(%s)', p_rel, p_watch_id);
    EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'NEW TABLE AS imgembed_new FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_update(%s)',
                   p_rel, p_watch_id);
    EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS imgembed_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_delete(%s)', p_rel, p_watch_id);
    IF p_partition THEN
        EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_truncate_partition(%s)', p_rel, p_watch_id);
    ELSE
        EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION imgembed._on_truncate(%s)', p_rel, p_watch_id);
    END IF;
    IF v_replicated THEN
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER imgembed_truncate', p_rel);
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = p_rel) = 'r' THEN
            EXECUTE format('CREATE OR REPLACE TRIGGER imgembed_replicated_row AFTER INSERT OR UPDATE OR DELETE ON %s '
                           'FOR EACH ROW EXECUTE FUNCTION imgembed._on_replicated_row(%s)', p_rel, p_watch_id);
            EXECUTE format('ALTER TABLE %s ENABLE REPLICA TRIGGER imgembed_replicated_row', p_rel);
        END IF;
    ELSIF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_rel AND t.tgname = 'imgembed_replicated_row') THEN
        EXECUTE format('DROP TRIGGER imgembed_replicated_row ON %s', p_rel);
    END IF;
END $$;

-- The tables carrying a watch's triggers.
CREATE OR REPLACE FUNCTION imgembed._triggered_tables(p_watch_id integer)
RETURNS SETOF regclass
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT t.tgrelid::regclass FROM pg_trigger t
     WHERE t.tgname = 'imgembed_insert'
       AND t.tgfoid = (SELECT f.oid FROM pg_proc f WHERE f.proname = '_on_insert' AND f.pronamespace = 'imgembed'::regnamespace)
       AND split_part(encode(t.tgargs, 'escape'), '\000', 1) = p_watch_id::text
$$;

-- Drop a watch's triggers from one table.
CREATE OR REPLACE FUNCTION imgembed._drop_triggers(p_rel regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger text;
BEGIN
    FOR v_trigger IN
        SELECT t.tgname FROM pg_trigger t
         WHERE t.tgrelid = p_rel AND t.tgname IN ('imgembed_insert', 'imgembed_update', 'imgembed_delete',
                                                  'imgembed_truncate', 'imgembed_replicated_row')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_rel);
    END LOOP;
END $$;

-- What differs between a watch's partition tree and the tables carrying its triggers.
CREATE OR REPLACE FUNCTION imgembed._partition_problems(p_watch imgembed.watch)
RETURNS TABLE (rel regclass, problem text, repair text)
LANGUAGE sql STABLE AS $$
    SELECT p, format('partition %s has no imgembed triggers: rows written into it directly are not embedded', p),
           'give it the triggers and embed its rows'
      FROM imgembed._partitions(p_watch.tbl) p
     WHERE p NOT IN (SELECT imgembed._triggered_tables(p_watch.id))
    UNION ALL
    SELECT t, format('table %s left the partition tree but keeps imgembed triggers', t),
           'drop its triggers and forget the vectors of its rows'
      FROM imgembed._triggered_tables(p_watch.id) t
     WHERE t <> p_watch.tbl AND t NOT IN (SELECT imgembed._partitions(p_watch.tbl))
$$;

-- Bring a watch's vectors and queue in line with its rows after its partition tree changed:
-- vectors and jobs of keys no longer in the table go; rows with an image, no vector and no job
-- are queued.
CREATE OR REPLACE FUNCTION imgembed._resync_rows(p_watch imgembed.watch)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_link imgembed.watch_model;
    v_queued bigint;
BEGIN
    EXECUTE format('DELETE FROM imgembed.job j WHERE j.watch_id = $1 AND NOT EXISTS '
                   '(SELECT 1 FROM %s s WHERE s.%I = j.key::%s)', p_watch.tbl, p_watch.key_column, p_watch.key_type)
    USING p_watch.id;
    FOR v_link IN SELECT * FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id LOOP
        EXECUTE format('DELETE FROM imgembed.%I e WHERE NOT EXISTS (SELECT 1 FROM %s s WHERE s.%I = e.id)',
                       v_link.storage_table, p_watch.tbl, p_watch.key_column);
        EXECUTE imgembed._enqueue_sql(
            p_watch, format('%s n', p_watch.tbl),
            format('NOT EXISTS (SELECT 1 FROM imgembed.%I e WHERE e.id = n.%I) AND NOT EXISTS (SELECT 1 FROM '
                   'imgembed.job j WHERE j.watch_id = %s AND j.model_id = %s AND j.key = n.%I::text)',
                   v_link.storage_table, p_watch.key_column, p_watch.id, v_link.model_id, p_watch.key_column),
            v_link.model_id);
        GET DIAGNOSTICS v_queued = ROW_COUNT;
        PERFORM imgembed._notify_jobs(v_queued);
    END LOOP;
END $$;

-- Give every table of the tree the watch's triggers and take them from tables that left it; the
-- rows follow (_resync_rows). Returns what it did, one line each.
CREATE OR REPLACE FUNCTION imgembed._sync_partitions(p_watch imgembed.watch)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_problem record;
    v_changed boolean := false;
BEGIN
    FOR v_problem IN SELECT * FROM imgembed._partition_problems(p_watch) LOOP
        IF v_problem.problem LIKE 'partition %' THEN
            PERFORM imgembed._install_triggers(p_watch.id, v_problem.rel, true);
        ELSE
            PERFORM imgembed._drop_triggers(v_problem.rel);
        END IF;
        v_changed := true;
        RETURN NEXT format('%s; did: %s', v_problem.problem, v_problem.repair);
    END LOOP;
    IF v_changed THEN
        PERFORM imgembed._resync_rows(p_watch);
    END IF;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/08_live_watch.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Watched tables change under imgembed: columns and tables are renamed, moved to another schema,
-- dropped, retyped. A watch keeps its columns by number (attnum) as well as by name; every part of
-- imgembed reads watches through imgembed._live_watch, which names them as they are now, so
-- renames need nothing. What a watch cannot follow (a dropped table or image column, a key or
-- image column of another type) takes it out of _live_watch, so that no other table's searches,
-- status or writes break; imgembed.watch_problems lists it and imgembed.repair_watches() (the
-- event triggers of 85_event_triggers.sql, or `imgembed doctor --fix`) repairs it.

-- The name of a live column by its number (NULL once dropped); without a number (a watch made
-- before revision 0007, or a table restored from a dump: _attnum) by the name recorded.
CREATE OR REPLACE FUNCTION imgembed._column_name(p_tbl regclass, p_attnum smallint, p_stored text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT a.attname::text COLLATE "default" FROM pg_attribute a
     WHERE a.attrelid = p_tbl AND NOT a.attisdropped AND a.attnum > 0
       AND CASE WHEN p_attnum IS NULL THEN a.attname = p_stored ELSE a.attnum = p_attnum END
$$;

-- A column number of a watch, when it still numbers the watched table's columns: not once the table
-- was recreated under the same name (restored from a dump, which may number columns anew).
CREATE OR REPLACE FUNCTION imgembed._attnum(p_watch imgembed.watch, p_attnum smallint)
RETURNS smallint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_watch.tbl_oid = p_watch.tbl::oid THEN p_attnum END
$$;

-- The type of a live column, as watch() records it (varchar as text).
CREATE OR REPLACE FUNCTION imgembed._column_type(p_tbl regclass, p_name text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE t WHEN 'character varying' THEN 'text' ELSE t END
      FROM (SELECT format_type(a.atttypid, NULL) AS t FROM pg_attribute a
             WHERE a.attrelid = p_tbl AND a.attname = p_name AND a.attnum > 0 AND NOT a.attisdropped) x
$$;

-- What is wrong with a watch whose table changed, or NULL. Renames are not wrong: they are followed.
CREATE OR REPLACE FUNCTION imgembed._watch_problem(p_watch imgembed.watch)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_key text;
    v_image text;
    v_image_attnum smallint := imgembed._attnum(p_watch, coalesce(p_watch.content_attnum, p_watch.uri_attnum,
                                                                  p_watch.text_attnum));
    v_image_stored text := coalesce(p_watch.content_column, p_watch.uri_column, p_watch.text_column);
    v_type text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p_watch.tbl) THEN
        RETURN format('table %s was dropped', p_watch.table_name);
    END IF;
    v_key := imgembed._column_name(p_watch.tbl, imgembed._attnum(p_watch, p_watch.key_attnum), p_watch.key_column);
    IF v_key IS NULL THEN
        RETURN format('key column %s was dropped', p_watch.key_column);
    END IF;
    v_type := imgembed._column_type(p_watch.tbl, v_key);
    IF v_type IS DISTINCT FROM p_watch.key_type THEN
        RETURN format('key column %s is now %s, was %s', v_key, v_type, p_watch.key_type);
    END IF;
    v_image := imgembed._column_name(p_watch.tbl, v_image_attnum, v_image_stored);
    IF v_image IS NULL THEN
        RETURN format('image column %s was dropped', v_image_stored);
    END IF;
    v_type := imgembed._column_type(p_watch.tbl, v_image);
    IF (p_watch.content_column IS NOT NULL AND v_type IS DISTINCT FROM 'bytea')
       OR (p_watch.content_column IS NULL AND v_type IS DISTINCT FROM 'text') THEN
        RETURN format('image column %s is now %s, was %s', v_image, v_type,
                      CASE WHEN p_watch.content_column IS NOT NULL THEN 'bytea' ELSE 'text' END);
    END IF;
    RETURN NULL;
END $$;

-- Every watch that still works, named as its table and columns are named now (a dropped label or
-- known-good column reads NULL). Same columns as imgembed.watch, so rows go into its row type.
CREATE OR REPLACE VIEW imgembed._live_watch AS
SELECT w.id, w.tbl,
       format('%I.%I', n.nspname, c.relname) COLLATE "default" AS table_name,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.key_attnum), w.key_column) AS key_column,
       w.key_type,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.content_attnum), w.content_column) AS content_column,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.uri_attnum), w.uri_column) AS uri_column,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.text_attnum), w.text_column) AS text_column,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.label_attnum), w.label_column) AS label_column,
       imgembed._column_name(w.tbl, imgembed._attnum(w, w.good_attnum), w.good_column) AS good_column,
       w.good_label, w.created_at,
       w.key_attnum, w.content_attnum, w.uri_attnum, w.text_attnum, w.label_attnum, w.good_attnum, w.tbl_oid,
       w.replicated
  FROM imgembed.watch w
  JOIN pg_class c ON c.oid = w.tbl
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE imgembed._watch_problem(w) IS NULL;

-- The watches imgembed cannot follow, what happened, and what imgembed.repair_watches() does.
CREATE OR REPLACE VIEW imgembed.watch_problems AS
SELECT w.id AS watch_id,
       CASE WHEN c.oid IS NULL THEN w.table_name ELSE format('%I.%I', n.nspname, c.relname) COLLATE "default" END
           AS table_name,
       p.problem,
       CASE WHEN c.oid IS NULL OR p.problem LIKE 'key column % was dropped' OR p.problem LIKE 'image column % was dropped'
                 OR (p.problem LIKE 'image column % is now %' AND p.problem NOT LIKE '% is now bytea, %'
                     AND p.problem NOT LIKE '% is now text, %')
                 THEN 'stop watching it: its vectors and jobs go'
            WHEN p.problem LIKE 'key column %' THEN 'watch it again with the new key type: every row is embedded again'
            ELSE 'watch it again with the new column type: every row is embedded again' END AS repair
  FROM imgembed.watch w
  LEFT JOIN pg_class c ON c.oid = w.tbl
  LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
 CROSS JOIN LATERAL (SELECT imgembed._watch_problem(w) AS problem) p
 WHERE p.problem IS NOT NULL
UNION ALL
SELECT l.id, l.table_name, p.problem, p.repair
  FROM imgembed._live_watch l
 CROSS JOIN LATERAL imgembed._partition_problems(ROW(l.*)::imgembed.watch) p;

-- Forget a watch whose table is gone or no longer usable: its vectors, jobs and triggers.
CREATE OR REPLACE FUNCTION imgembed._drop_watch(p_watch imgembed.watch)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_storage text;
BEGIN
    -- Jobs first: a worker finishing one holds its row lock, and then wants the vector table; taking
    -- the vector tables first would deadlock with it.
    PERFORM imgembed._delete_jobs(p_watch.id);
    PERFORM imgembed._drop_triggers(t.t) FROM imgembed._triggered_tables(p_watch.id) AS t(t);
    FOR v_storage IN SELECT wm.storage_table FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id LOOP
        EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_storage);
    END LOOP;
    DELETE FROM imgembed.watch w WHERE w.id = p_watch.id;
END $$;

-- Repair every watch imgembed.watch_problems lists, and keep the recorded names of the others up to
-- date. A watch whose table, key or image column is gone stops (its vectors and jobs go); one whose
-- key or image column changed type is watched again, with the same label column and models, and
-- every row is embedded again. Returns one line per repair.
CREATE OR REPLACE FUNCTION imgembed.repair_watches()
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_problem text;
    v_repair text;
    v_image text;
    v_label text;
    v_models text[];
    v_default text;
    v_model text;
    v_good text;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed.watch ORDER BY id LOOP
        IF v_watch.tbl_oid IS DISTINCT FROM v_watch.tbl::oid AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = v_watch.tbl)
           AND imgembed._watch_problem(v_watch) IS NULL THEN
            -- Recreated (restored from a dump): found by name, numbered again.
            UPDATE imgembed.watch w
               SET tbl_oid = w.tbl::oid,
                   key_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.key_column),
                   content_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.content_column),
                   uri_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.uri_column),
                   text_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.text_column),
                   label_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.label_column),
                   good_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = l.good_column)
              FROM imgembed._live_watch l
             WHERE w.id = v_watch.id AND l.id = w.id
            RETURNING w.* INTO v_watch;
            RETURN NEXT format('%s: the table was made anew (restored from a dump?): its columns, found by name, '
                               'are numbered again', v_watch.table_name);
        END IF;
        v_problem := imgembed._watch_problem(v_watch);
        SELECT p.repair INTO v_repair FROM imgembed.watch_problems p WHERE p.watch_id = v_watch.id AND p.problem = v_problem;
        IF v_problem IS NULL THEN
            -- Its partition tree: triggers on every partition, none on tables that left it.
            RETURN QUERY SELECT format('%s: %s', v_watch.table_name, m)
                           FROM imgembed._sync_partitions(ROW(v_watch.*)::imgembed.watch) m;
            -- Followed renames: the recorded names catch up (messages and dumps read them).
            UPDATE imgembed.watch w SET table_name = l.table_name, key_column = l.key_column,
                   content_column = l.content_column, uri_column = l.uri_column, text_column = l.text_column,
                   label_column = l.label_column, good_column = l.good_column,
                   label_attnum = CASE WHEN l.label_column IS NULL THEN NULL ELSE w.label_attnum END,
                   good_attnum = CASE WHEN l.good_column IS NULL THEN NULL ELSE w.good_attnum END,
                   good_label = CASE WHEN l.label_column IS NULL THEN NULL ELSE w.good_label END
              FROM imgembed._live_watch l
             WHERE w.id = v_watch.id AND l.id = w.id
               AND (w.table_name, w.key_column, w.content_column, w.uri_column, w.text_column, w.label_column,
                    w.good_column) IS DISTINCT FROM
                   (l.table_name, l.key_column, l.content_column, l.uri_column, l.text_column, l.label_column,
                    l.good_column);
            CONTINUE;
        END IF;
        IF v_repair LIKE 'stop watching%' THEN
            PERFORM imgembed._drop_watch(v_watch);
            RETURN NEXT format('%s: %s; stopped watching it', v_watch.table_name, v_problem);
            CONTINUE;
        END IF;
        -- Watched again as it is now, with its label column and models, the default first.
        v_image := imgembed._column_name(v_watch.tbl, imgembed._attnum(v_watch, coalesce(v_watch.content_attnum,
                                         v_watch.uri_attnum)), coalesce(v_watch.content_column, v_watch.uri_column));
        v_label := imgembed._column_name(v_watch.tbl, imgembed._attnum(v_watch, v_watch.label_attnum),
                                         v_watch.label_column);
        v_good := imgembed._column_name(v_watch.tbl, imgembed._attnum(v_watch, v_watch.good_attnum),
                                        v_watch.good_column);
        SELECT m.name INTO v_default FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
         WHERE wm.watch_id = v_watch.id AND wm.is_default;
        SELECT array_agg(m.name ORDER BY m.id) INTO v_models FROM imgembed.watch_model wm
          JOIN imgembed.model m ON m.id = wm.model_id WHERE wm.watch_id = v_watch.id AND NOT wm.is_default;
        PERFORM imgembed._drop_watch(v_watch);
        PERFORM imgembed.watch(v_watch.tbl, v_image, v_label, v_default, v_watch.replicated);
        FOREACH v_model IN ARRAY coalesce(v_models, '{}') LOOP
            PERFORM imgembed.add_model(v_watch.tbl, v_model);
        END LOOP;
        IF v_good IS NOT NULL OR (v_label IS NOT NULL AND v_watch.good_label IS NOT NULL) THEN
            PERFORM imgembed.set_known_good(v_watch.tbl, v_good, CASE WHEN v_good IS NULL THEN v_watch.good_label END);
        END IF;
        RETURN NEXT format('%s: %s; watched again, every row is embedded again', v_watch.table_name, v_problem);
    END LOOP;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/10_catalog.sql as released with revision 0011
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/20_watch.sql as released with revision 0011
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

-- A vector table shows a role only the rows of the watched table that role may SELECT: its
-- privileges and row-level security on the watched table carry over to every search. The owner
-- (workers and triggers run as it) sees every row. Applied again at every upgrade.
CREATE OR REPLACE FUNCTION imgembed._secure_storage(p_watch imgembed.watch, p_storage text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE imgembed.%I ENABLE ROW LEVEL SECURITY', p_storage);
    EXECUTE format('DROP POLICY IF EXISTS visible_rows ON imgembed.%I', p_storage);
    -- OFFSET 0 keeps the check a probe of the watched table's key for each row the search looks
    -- at: flattened into a join, the planner would read the whole watched table for every search.
    EXECUTE format('CREATE POLICY visible_rows ON imgembed.%1$I FOR SELECT '
                   'USING (EXISTS (SELECT 1 FROM %2$s s WHERE s.%3$I = %1$I.id OFFSET 0))',
                   p_storage, p_watch.tbl, p_watch.key_column);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        EXECUTE format('GRANT SELECT ON imgembed.%I TO imgembed_reader', p_storage);
    END IF;
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
    INSERT INTO imgembed.watch_model (watch_id, model_id, storage_table, is_default)
    VALUES (p_watch.id, p_model.id, v_storage,
            p_make_default OR NOT EXISTS (SELECT 1 FROM imgembed.watch_model WHERE watch_id = p_watch.id))
    RETURNING * INTO v_link;

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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/30_triggers.sql as released with revision 0011
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
-- so the SQL is built by helpers and executed here, with the columns' names of the moment.

CREATE OR REPLACE FUNCTION imgembed._on_insert()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_queued bigint;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN  -- the table changed beyond what the watch follows: writes go on (watch_problems)
        RETURN NULL;
    END IF;
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
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN  -- the table changed beyond what the watch follows: writes go on (watch_problems)
        RETURN NULL;
    END IF;
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
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN  -- the table changed beyond what the watch follows: writes go on (watch_problems)
        RETURN NULL;
    END IF;
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

-- TRUNCATE of one partition (before it happens, while its rows are still there): its rows'
-- vectors and jobs go, the other partitions' stay.
CREATE OR REPLACE FUNCTION imgembed._on_truncate_partition()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_statement text;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    FOREACH v_statement IN ARRAY imgembed._forget_sql(v_watch, format('%s o', TG_RELID::regclass)) LOOP
        EXECUTE v_statement;
    END LOOP;
    RETURN NULL;
END $$;

-- Rows applied by a logical replication subscription (watch(..., replicated => true); see
-- imgembed._install_triggers), one at a time: the same statements as the statement triggers, with
-- the row as $1 (and, for an update, the old row as $2) in place of the transition tables.
CREATE OR REPLACE FUNCTION imgembed._on_replicated_row()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_queued bigint;
    v_statement text;
BEGIN
    SELECT * INTO v_watch FROM imgembed._live_watch WHERE id = TG_ARGV[0]::integer;
    IF NOT FOUND THEN  -- the table changed beyond what the watch follows: writes go on (watch_problems)
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        FOREACH v_statement IN ARRAY imgembed._forget_sql(v_watch, '(SELECT ($1).*) o') LOOP
            EXECUTE v_statement USING OLD;
        END LOOP;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        EXECUTE imgembed._enqueue_sql(v_watch, '(SELECT ($1).*) n') USING NEW;
    ELSE
        -- A new key or a cleared image: the old key is forgotten. A new key or image: embedded again.
        FOREACH v_statement IN ARRAY imgembed._forget_sql(
            v_watch, '(SELECT ($1).*) o CROSS JOIN (SELECT ($2).*) n',
            format('n.%1$I IS DISTINCT FROM o.%1$I OR NOT (%2$s)', v_watch.key_column,
                   imgembed._has_image_sql(v_watch, 'n')))
        LOOP
            EXECUTE v_statement USING OLD, NEW;
        END LOOP;
        EXECUTE imgembed._enqueue_sql(
            v_watch, '(SELECT ($1).*) o CROSS JOIN (SELECT ($2).*) n',
            format('o.%1$I IS DISTINCT FROM n.%1$I OR %2$s', v_watch.key_column, imgembed._image_changed_sql(v_watch)))
        USING OLD, NEW;
    END IF;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM imgembed._notify_jobs(v_queued);
    RETURN NULL;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/40_queue.sql as released with revision 0011
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

-- What a claim's jobs embed (image bytes, image location or text), read from the watched tables,
-- with the table's name. A job whose row is gone is absent.
CREATE OR REPLACE FUNCTION imgembed.claimed_images(p_claim uuid)
RETURNS TABLE (job_id bigint, key text, content bytea, uri text, body text, table_name text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN
        SELECT w.* FROM imgembed._live_watch w
         WHERE w.id IN (SELECT j.watch_id FROM imgembed.job j WHERE j.claim_id = p_claim)
    LOOP
        RETURN QUERY EXECUTE format(
            'SELECT j.id, j.key, %s, %s, %s, $3 FROM imgembed.job j JOIN %s s ON s.%I = j.key::%s '
            'WHERE j.claim_id = $1 AND j.watch_id = $2 AND j.status = ''in_flight''',
            CASE WHEN v_watch.content_column IS NULL THEN 'NULL::bytea'
                 ELSE format('s.%I', v_watch.content_column) END,
            CASE WHEN v_watch.uri_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.uri_column) END,
            CASE WHEN v_watch.text_column IS NULL THEN 'NULL::text'
                 ELSE format('s.%I::text', v_watch.text_column) END,
            v_watch.tbl, v_watch.key_column, v_watch.key_type)
        USING p_claim, v_watch.id, v_watch.table_name;
    END LOOP;
END $$;

-- Finish a claim in one transaction: write the vectors of p_done_ids (a NULL vector means the row
-- is gone: nothing to write), complete those jobs, and record p_failed_ids with their errors
-- (retried with exponential backoff when p_retryable and attempts remain, else failed).
-- Only jobs this claim still owns are touched. Returns the number of vectors written.
-- p_hashes: the SHA-256 of the image bytes each vector was made from (NULL for texts), kept beside
-- it so that the same bytes are not embedded again (vectors_by_content).
CREATE OR REPLACE FUNCTION imgembed.finish_batch(
    p_claim uuid,
    p_done_ids bigint[],
    p_vectors @vector@.vector[],
    p_failed_ids bigint[],
    p_errors text[],
    p_retryable boolean[],
    p_max_attempts integer,
    p_backoff_seconds double precision,
    p_hashes bytea[] DEFAULT NULL
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
          FROM imgembed._live_watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
         WHERE (w.id, wm.model_id) IN (SELECT j.watch_id, j.model_id FROM imgembed.job j WHERE j.id = ANY (v_owned))
    LOOP
        EXECUTE format($f$
            INSERT INTO imgembed.%1$I AS e (id, embedding, job_id, content_sha256)
            SELECT s.%3$I, v.vec, j.id, v.sha
              FROM unnest($1::bigint[], $2::@vector@.vector[],
                          coalesce($5, array_fill(NULL::bytea, ARRAY[cardinality($1)]))) AS v(job_id, vec, sha)
              JOIN imgembed.job j ON j.id = v.job_id
              JOIN %2$s s ON s.%3$I = j.key::%4$s
             WHERE v.vec IS NOT NULL AND j.id = ANY ($3) AND j.watch_id = $4
            ON CONFLICT (id) DO UPDATE
               SET embedding = excluded.embedding, job_id = excluded.job_id, embedded_at = now(),
                   content_sha256 = excluded.content_sha256
             WHERE e.job_id < excluded.job_id$f$,
            v_target.storage_table, v_target.tbl, v_target.key_column, v_target.key_type)
        USING p_done_ids, p_vectors, v_owned, v_target.watch_id, p_hashes;
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

-- Vectors the model already made from these image bytes (by their SHA-256), in any table: a worker
-- writes them again instead of embedding the same bytes once more. One vector per hash.
CREATE OR REPLACE FUNCTION imgembed.vectors_by_content(p_model text, p_hashes bytea[])
RETURNS TABLE (content_sha256 bytea, embedding @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_storage text;
    v_found bytea[] := '{}';
    v_hashes bytea[];
    v_vectors @vector@.vector[];
BEGIN
    FOR v_storage IN
        SELECT wm.storage_table FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
          JOIN imgembed.watch w ON w.id = wm.watch_id
         WHERE m.name = p_model AND w.text_column IS NULL ORDER BY wm.watch_id
    LOOP
        EXIT WHEN cardinality(v_found) >= cardinality(p_hashes);
        EXECUTE format(
            'SELECT coalesce(array_agg(x.h), ''{}''), coalesce(array_agg(x.v), ''{}'') FROM ('
            ' SELECT DISTINCT ON (e.content_sha256) e.content_sha256 AS h, e.embedding AS v FROM imgembed.%I e'
            '  WHERE e.content_sha256 = ANY ($1) AND e.content_sha256 <> ALL ($2)) x', v_storage)
           INTO v_hashes, v_vectors USING p_hashes, v_found;
        RETURN QUERY SELECT u.h, u.v FROM unnest(v_hashes, v_vectors) AS u(h, v);
        v_found := v_found || v_hashes;
    END LOOP;
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

-- sql/50_status.sql as released with revision 0011
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

-- Jobs per (watched table, model), in one pass over the queue: rows queued (jobs pending, and keys
-- the triggers wrote that are not jobs yet), in flight and failed, and when the oldest queued row
-- was queued. What status and backlog() count; each role counts the jobs it may see.
CREATE OR REPLACE FUNCTION imgembed._job_counts()
RETURNS TABLE (watch_id integer, model_id integer, queued bigint, in_flight bigint, failed bigint,
               oldest_queued timestamptz)
LANGUAGE sql STABLE AS $$
    WITH jobs AS (
        SELECT j.watch_id, j.model_id, count(*) FILTER (WHERE j.status = 'pending') AS pending,
               count(*) FILTER (WHERE j.status = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE j.status = 'failed') AS failed,
               min(j.enqueued_at) FILTER (WHERE j.status = 'pending') AS oldest
          FROM imgembed.job j GROUP BY j.watch_id, j.model_id),
    written AS (
        SELECT i.watch_id, wm.model_id, sum(cardinality(i.keys)) AS keys, min(i.created_at) AS oldest
          FROM imgembed.intake i
          JOIN imgembed.watch_model wm ON wm.watch_id = i.watch_id AND (i.model_id IS NULL OR i.model_id = wm.model_id)
         GROUP BY i.watch_id, wm.model_id)
    SELECT wm.watch_id, wm.model_id, (coalesce(j.pending, 0) + coalesce(k.keys, 0))::bigint, coalesce(j.in_flight, 0),
           coalesce(j.failed, 0), least(j.oldest, k.oldest)
      FROM imgembed.watch_model wm
      LEFT JOIN jobs j ON j.watch_id = wm.watch_id AND j.model_id = wm.model_id
      LEFT JOIN written k ON k.watch_id = wm.watch_id AND k.model_id = wm.model_id
$$;

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
               imgembed._has_image_sql(ROW(w.*)::imgembed.watch, 's') AS has_image,
               c.queued, c.in_flight, c.failed, now() - c.oldest_queued AS oldest_queued_age
          FROM imgembed._live_watch w
          JOIN imgembed.watch_model wm ON wm.watch_id = w.id
          JOIN imgembed.model m ON m.id = wm.model_id
          JOIN imgembed._job_counts() c ON c.watch_id = wm.watch_id AND c.model_id = wm.model_id
         WHERE has_table_privilege(w.tbl, 'SELECT')  -- a role sees the tables it may read
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
        pending := v_link.queued;  -- keys still in the intake (not yet jobs) are pending too
        in_flight := v_link.in_flight;
        failed := v_link.failed;
        oldest_pending_age := v_link.oldest_queued_age;
        RETURN NEXT;
    END LOOP;
END $$;

-- Per watched table and model: rows with an image, rows embedded, jobs pending / in flight /
-- failed, how long the oldest pending job has waited, and vectors written in the last 1 and 5
-- minutes (throughput). Counts are exact.
CREATE OR REPLACE VIEW imgembed.status AS
SELECT * FROM imgembed._status_rows();

-- The work waiting per (table, model), cheap enough to read every few seconds: rows queued (jobs
-- pending, and changed keys the triggers wrote that are not jobs yet), jobs in flight, and how long
-- the oldest queued row has waited (NULL: none). What autoscalers and the dispatcher's metrics
-- read; the workers' role may call it (docs/monitoring.md). Runs as its owner: counts only.
CREATE OR REPLACE FUNCTION imgembed.backlog()
RETURNS TABLE (table_name text, model text, queued bigint, in_flight bigint, oldest_queued_seconds double precision)
LANGUAGE sql STABLE AS $$
    SELECT w.table_name, m.name, c.queued, c.in_flight, extract(epoch FROM now() - c.oldest_queued)::float8
      FROM imgembed._live_watch w
      JOIN imgembed._job_counts() c ON c.watch_id = w.id
      JOIN imgembed.model m ON m.id = c.model_id
     ORDER BY 1, 2
$$;

-- Every failed job with its reason: of the rows the calling role may read.
CREATE OR REPLACE VIEW imgembed.failures WITH (security_barrier) AS
SELECT w.table_name, j.key, m.name AS model, j.attempts, j.last_error, j.updated_at AS failed_at
  FROM imgembed.job j
  JOIN imgembed._live_watch w ON w.id = j.watch_id
  JOIN imgembed.model m ON m.id = j.model_id
 WHERE j.status = 'failed' AND has_table_privilege(w.tbl, 'SELECT') AND imgembed._row_visible(w.id, j.key);

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

-- The table holding a watched table's vectors for a model (default: the table's default model),
-- for queries that read vectors directly: columns id (the key), embedding, job_id, embedded_at.
-- As text it is qualified (imgembed.emb_3_1) unless imgembed is on the search path.
CREATE OR REPLACE FUNCTION imgembed.storage_table(tbl regclass, model text DEFAULT NULL)
RETURNS regclass
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN format('imgembed.%I', (imgembed._watch_model_of(imgembed._watch_of(tbl), model)).storage_table)::regclass;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/60_search.sql as released with revision 0011
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
-- Ties are ordered by the key in its own type (13 before 111). Keyset pagination: rows after
-- (p_after_distance, p_after_id) in that (distance, key) order; p_after_id is the key as text.
-- A relevance cut-off (p_max_distance) keeps only the rows at most that far of the k nearest, on
-- every path alike: fewer than k rows, or none, may come back.
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
    p_after_id text DEFAULT NULL,
    p_max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql
SET hnsw.iterative_scan = 'strict_order'
AS $$
DECLARE
    v_dim integer;
    v_filter text := imgembed._filter_sql(p_watch, p_filter, 4);
    v_template text;
    v_join text;
    v_after text;
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
    -- One query, filled once per path with its ORDER BY (%6$s) and LIMIT (%7$s). The template is a
    -- constant and everything goes in through a single format(): a filter or label value holding
    -- '%' stays data.
    v_template := 'SELECT (array_agg(q.id ORDER BY q.d, q.k))[1:$2], (array_agg(q.d ORDER BY q.d, q.k))[1:$2] FROM ('
        ' SELECT e.id AS k, e.id::text AS id, (e.embedding OPERATOR(@vector@.<=>) $1)::float8 AS d FROM imgembed.%1$I e %2$s'
        ' WHERE e.id::text <> ALL ($3) AND (%3$s) AND (%4$s) AND (%5$s) ORDER BY %6$s LIMIT %7$s) q';
    v_join := CASE WHEN v_filter IS NULL AND p_condition IS NULL THEN ''
                   ELSE format('JOIN %s s ON s.%I = e.id', p_watch.tbl, p_watch.key_column) END;
    v_after := CASE WHEN p_after_distance IS NULL THEN 'true'
                    ELSE '(e.embedding OPERATOR(@vector@.<=>) $1) > $5 OR ((e.embedding OPERATOR(@vector@.<=>) $1) = $5 '
                         || format('AND e.id > $6::%s)', p_watch.key_type) END;

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
        EXECUTE format(v_template, p_link.storage_table, v_join, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'),
                       v_after,
                       format('e.embedding::@vector@.halfvec(%1$s) OPERATOR(@vector@.<=>) $1::@vector@.halfvec(%1$s)', v_dim),
                       '$2 * 2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    IF p_exact OR ((v_filter IS NOT NULL OR p_condition IS NOT NULL) AND coalesce(cardinality(v_ids), 0) < p_k) THEN
        -- "+ 0" keeps the planner off the index: an exact scan in (distance, key) order.
        EXECUTE format(v_template, p_link.storage_table, v_join, coalesce(v_filter, 'true'), coalesce(p_condition, 'true'),
                       v_after, '(e.embedding OPERATOR(@vector@.<=>) $1) + 0, e.id', '$2')
           INTO v_ids, v_distances
          USING p_query, p_k, coalesce(p_exclude, '{}'), p_filter, p_after_distance, p_after_id;
    END IF;
    PERFORM set_config('hnsw.ef_search', coalesce(v_previous_ef, '40'), true);
    RETURN QUERY SELECT u.id, u.d FROM unnest(v_ids, v_distances) WITH ORDINALITY AS u(id, d, n)
                  WHERE p_max_distance IS NULL OR u.d <= p_max_distance ORDER BY u.n;
END $$;

-- The k images most similar to one row (itself excluded), nearest first. Keys come back in the
-- type of the key given (anycompatible: after_id => 105 goes with key => 42::bigint).
CREATE OR REPLACE FUNCTION imgembed.similar(
    tbl regclass,
    key anycompatible,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anycompatible DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed._knn($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9, $10, $11) r',
        pg_typeof(key))
    USING v_watch, v_link, imgembed._require_vector(v_watch, v_link, key::text), k, ARRAY[key::text],
          filter, exact, ef_search, after_distance, after_id::text, max_distance;
END $$;

-- The k rows nearest to any vector of the model's dimension. Keys come back as text; the
-- overload with a key_type argument (e.g. NULL::bigint) returns them in that type, and takes
-- after_id in it too.
CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id text DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    RETURN QUERY SELECT r.id, r.distance FROM imgembed._knn(
        v_watch, imgembed._watch_model_of(v_watch, model), vec, k, '{}', filter, NULL, exact, ef_search,
        after_distance, after_id, max_distance) r;
END $$;

CREATE OR REPLACE FUNCTION imgembed.similar_to_vector(
    tbl regclass,
    key_type anycompatible,
    vec @vector@.vector,
    k integer DEFAULT 10,
    model text DEFAULT NULL,
    filter jsonb DEFAULT NULL,
    ef_search integer DEFAULT NULL,
    exact boolean DEFAULT false,
    after_distance double precision DEFAULT NULL,
    after_id anycompatible DEFAULT NULL,
    max_distance double precision DEFAULT NULL
) RETURNS TABLE (id anycompatible, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT r.id::%s, r.distance FROM imgembed.similar_to_vector($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) r',
        pg_typeof(key_type))
    USING tbl, vec, k, model, filter, ef_search, exact, after_distance, after_id::text, max_distance;
END $$;

-- Pairs of rows whose images are near-identical (cosine distance <= max_distance), each pair once,
-- nearest first, then by key. Each row's per_item nearest neighbours are examined (HNSW), so a
-- group larger than per_item identical images yields only part of its pairs: raise per_item for
-- such data. Keys come back as text; the overload with a key_type argument returns them typed.
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
    IF max_distance IS NULL THEN  -- near_duplicates('t', NULL::bigint) lands here: bigint casts to a distance
        RAISE EXCEPTION 'max_distance is NULL'
            USING HINT = 'for keys in their own type give the type and the distance: '
                         'near_duplicates(''products'', NULL::bigint, 0.02)',
                  ERRCODE = 'null_value_not_allowed';
    END IF;
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

CREATE OR REPLACE FUNCTION imgembed.near_duplicates(
    tbl regclass,
    key_type anyelement,
    max_distance double precision DEFAULT 0.02,
    model text DEFAULT NULL,
    per_item integer DEFAULT 10
) RETURNS TABLE (a anyelement, b anyelement, distance double precision)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT p.a::%1$s, p.b::%1$s, p.distance FROM imgembed.near_duplicates($1, $2, $3, $4) p ORDER BY 3, 1, 2',
        pg_typeof(key_type))
    USING tbl, max_distance, model, per_item;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/61_text.sql as released with revision 0011
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

-- Refuse one more text or query image while 1,000 of them (rows of p_tbl, one of imgembed's query
-- tables) wait for a worker: no one can bury the workers in them. p_what names them in the error.
CREATE OR REPLACE FUNCTION imgembed._check_waiting(p_tbl regclass, p_what text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch_id integer := (SELECT w.id FROM imgembed.watch w WHERE w.tbl = p_tbl);
BEGIN
    IF (SELECT count(*) FROM imgembed.job j WHERE j.watch_id = v_watch_id AND j.status <> 'failed')
       + (SELECT coalesce(sum(cardinality(i.keys)), 0) FROM imgembed.intake i WHERE i.watch_id = v_watch_id) >= 1000 THEN
        RAISE EXCEPTION 'too many % wait for a worker (1,000); try again in a moment', p_what
            USING HINT = 'is an imgembed worker running? (see imgembed.status)', ERRCODE = 'too_many_connections';
    END IF;
END $$;

-- Queue a text for embedding (idempotent); returns its id. Commit before waiting for it. Runs as
-- its owner: texts are private (no reader may list them), and a text is at most 1,000 characters
-- while at most 1,000 texts wait for a worker, so no one can bury the workers in texts.
CREATE OR REPLACE FUNCTION imgembed.request_text(query text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    IF query IS NULL OR btrim(query) = '' THEN
        RAISE EXCEPTION 'the text query is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(query) > 1000 THEN
        RAISE EXCEPTION 'the text query has % characters; at most 1,000 are embedded', length(query)
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = request_text.query;
    IF v_id IS NOT NULL THEN
        RETURN v_id;
    END IF;
    PERFORM imgembed._check_waiting('imgembed.text_query', 'texts');
    INSERT INTO imgembed.text_query (query) VALUES (request_text.query) ON CONFLICT DO NOTHING;
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = request_text.query;
    RETURN v_id;
END $$;

-- Whether a text was requested, and its vector under a model (NULL until a worker embeds it). Runs
-- as its owner, so that a role learns about the texts it names and no others.
CREATE OR REPLACE FUNCTION imgembed._text_state(p_query text, p_model text, OUT requested boolean,
                                                OUT vec @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_id bigint;
    v_storage text;
BEGIN
    SELECT t.id INTO v_id FROM imgembed.text_query t WHERE t.query = p_query;
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

-- Enqueue a text in a transaction of its own (see _request_elsewhere).
CREATE OR REPLACE FUNCTION imgembed._request_text_elsewhere(p_query text)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT imgembed._request_elsewhere(format('SELECT imgembed.request_text(%L)', p_query))
$$;

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
BEGIN
    PERFORM imgembed._require_text_model(text_vector.model);
    IF NOT EXISTS (SELECT 1 FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
                     JOIN imgembed.model m ON m.id = wm.model_id
                    WHERE w.tbl = 'imgembed.text_query'::regclass AND m.name = text_vector.model) THEN
        RAISE EXCEPTION 'model % does not embed texts yet', text_vector.model
            USING HINT = 'attach it to an image table with imgembed.add_model()', ERRCODE = 'undefined_object';
    END IF;
    v_state := imgembed._text_state(query, model);
    IF NOT v_state.requested THEN
        IF NOT imgembed._request_text_elsewhere(query) THEN
            RAISE EXCEPTION 'text "%" has not been requested yet', query
                USING HINT = format('run SELECT imgembed.request_text(%L) in its own transaction first '
                                    '(or install the dblink extension so search_text can do it)', query),
                      ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    END IF;
    LOOP
        v_state := imgembed._text_state(query, model);
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
BEGIN
    PERFORM imgembed._require_text_model((SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id));
    SELECT wm.storage_table INTO v_prompt_storage FROM imgembed.watch_model wm
     WHERE wm.watch_id = v_prompt_watch.id AND wm.model_id = v_link.model_id;
    IF v_prompt_storage IS NULL THEN
        RAISE EXCEPTION 'model % does not embed label prompts', (SELECT m.name FROM imgembed.model m WHERE m.id = v_link.model_id)
            USING HINT = 'a model embeds texts once it is registered (imgembed models add)', ERRCODE = 'undefined_object';
    END IF;
    LOOP
        SELECT array_agg(p.label ORDER BY p.label), min(p.label || ': ' || p.error)
          INTO v_pending, v_failed
          FROM imgembed._pending_prompt_labels(v_prompt_storage, v_link.model_id, labels) p;
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
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no label prompt%', CASE WHEN labels IS NULL THEN '' ELSE format(' for labels %s', labels) END
            USING HINT = 'insert rows into imgembed.label_prompt (label, prompt) and let a worker embed them',
                  ERRCODE = 'no_data_found';
    END IF;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/62_labels.sql as released with revision 0011
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

-- One table's embedded, unlabelled rows (key order) with the label their p_k nearest labelled
-- neighbours vote for, under the table's default model.
CREATE OR REPLACE FUNCTION imgembed._table_predicted_labels(p_watch imgembed.watch, p_k integer)
RETURNS TABLE (key text, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link imgembed.watch_model;
    v_key text;
    v_vector @vector@.vector;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id AND wm.is_default;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT m.name INTO model FROM imgembed.model m WHERE m.id = v_link.model_id;
    FOR v_key, v_vector IN EXECUTE format(
        'SELECT e.id::text, e.embedding FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE s.%I IS NULL ORDER BY e.id',
        v_link.storage_table, p_watch.tbl, p_watch.key_column, p_watch.label_column)
    LOOP
        key := v_key;
        SELECT v.label, v.confidence INTO label, confidence
          FROM imgembed._vote(p_watch, v_link, v_vector, p_k, ARRAY[v_key], false) v LIMIT 1;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION imgembed._predicted_labels(p_k integer DEFAULT 5)
RETURNS TABLE (table_name text, key text, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed._live_watch w WHERE w.label_column IS NOT NULL AND has_table_privilege(w.tbl, 'SELECT')
                    ORDER BY w.table_name LOOP
        RETURN QUERY SELECT v_watch.table_name, p.* FROM imgembed._table_predicted_labels(v_watch, p_k) p;
    END LOOP;
END $$;

-- Every embedded, unlabelled row of every watched table with a label column, with the label its
-- 5 nearest labelled neighbours vote for (NULL when no row is labelled yet). The view spans
-- tables, so keys are text: the function of the same name gives one table's keys in their type.
CREATE OR REPLACE VIEW imgembed.predicted_labels AS
SELECT * FROM imgembed._predicted_labels(5);

-- One table's predicted labels with keys in its own type: predicted_labels('faces', NULL::text).
CREATE OR REPLACE FUNCTION imgembed.predicted_labels(tbl regclass, key_type anyelement, k integer DEFAULT 5)
RETURNS TABLE (key anyelement, model text, label text, confidence double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    IF v_watch.label_column IS NULL THEN
        RAISE EXCEPTION 'table % has no label column', v_watch.table_name
            USING HINT = 'watch it with label_column => ''your_label_column''', ERRCODE = 'undefined_column';
    END IF;
    RETURN QUERY EXECUTE format('SELECT p.key::%s, p.model, p.label, p.confidence '
                                'FROM imgembed._table_predicted_labels($1, $2) p', pg_typeof(key_type))
    USING v_watch, k;
END $$;

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

-- sql/63_recommend.sql as released with revision 0011
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/64_joins.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Similarity joins across watched tables: for each row of one table, its k nearest rows of another
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/65_query_images.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Query images: an image that is in no table (a photo a customer uploads) is searched with like a
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

-- Queue image bytes for embedding (idempotent: the same bytes are one row); returns its id.
-- Commit before waiting for it. Runs as its owner: query images are private (no reader may list
-- them); one is at most 32 MB.
CREATE OR REPLACE FUNCTION imgembed.request_image(image bytea)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_hash bytea;
    v_id bigint;
BEGIN
    IF image IS NULL OR length(image) = 0 THEN
        RAISE EXCEPTION 'the query image is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(image) > 32 * 1024 * 1024 THEN
        RAISE EXCEPTION 'the query image has % bytes; at most 32 MB are taken', length(image)
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    v_hash := sha256(image);
    SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.content_sha256 = v_hash;
    IF v_id IS NULL THEN
        PERFORM imgembed._check_waiting('imgembed.image_query', 'query images');
        INSERT INTO imgembed.image_query (content, content_sha256) VALUES (image, v_hash) ON CONFLICT DO NOTHING;
        SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.content_sha256 = v_hash;
    END IF;
    RETURN v_id;
END $$;

-- Queue an image location (absolute path, file:// or http(s):// URI) for embedding; returns its id.
-- A location is read once and its vector kept: a file changed in place keeps its first vector. A
-- location that could not be read is tried again when it is requested again.
CREATE OR REPLACE FUNCTION imgembed.request_image_at(location text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_watch_id integer := (SELECT w.id FROM imgembed.watch w WHERE w.tbl = 'imgembed.image_query'::regclass);
    v_retried integer;
BEGIN
    IF location IS NULL OR btrim(location) = '' THEN
        RAISE EXCEPTION 'the image location is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(location) > 2000 THEN
        RAISE EXCEPTION 'the image location has % characters; at most 2,000 are taken', length(location)
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.uri = location;
    IF v_id IS NULL THEN
        PERFORM imgembed._check_waiting('imgembed.image_query', 'query images');
        INSERT INTO imgembed.image_query (uri) VALUES (location) ON CONFLICT DO NOTHING;
        SELECT q.id INTO v_id FROM imgembed.image_query q WHERE q.uri = location;
    ELSE
        UPDATE imgembed.job j SET status = 'pending', attempts = 0, not_before = now(), updated_at = now()
         WHERE j.watch_id = v_watch_id AND j.key = v_id::text AND j.status = 'failed'
           AND NOT imgembed._superseded(j.watch_id, j.model_id, j.key);
        GET DIAGNOSTICS v_retried = ROW_COUNT;
        PERFORM imgembed._notify_jobs(v_retried);
    END IF;
    RETURN v_id;
END $$;

-- A query image's state under a model (by the SHA-256 of its bytes, or else its location): its row (NULL: never requested), its vector (NULL until a
-- worker embeds it) and, once it failed for good, why. Runs as its owner, so that a role learns
-- about the images it names and no others.
CREATE OR REPLACE FUNCTION imgembed._image_state(p_sha256 bytea, p_location text, p_model text,
                                                 OUT query_id bigint, OUT vec @vector@.vector, OUT error text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_link imgembed.watch_model;
BEGIN
    SELECT q.id INTO query_id FROM imgembed.image_query q
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

-- Enqueue a query image in a transaction of its own (see _request_elsewhere).
CREATE OR REPLACE FUNCTION imgembed._request_image_elsewhere(p_image bytea, p_location text)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT imgembed._request_elsewhere(CASE WHEN p_image IS NULL
                                            THEN format('SELECT imgembed.request_image_at(%L)', p_location)
                                            ELSE format('SELECT imgembed.request_image(%L::bytea)', p_image) END)
$$;

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
BEGIN
    IF p_image IS NULL AND p_location IS NULL THEN
        RAISE EXCEPTION 'the query image is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
                     JOIN imgembed.model m ON m.id = wm.model_id
                    WHERE w.tbl = 'imgembed.image_query'::regclass AND m.name = p_model) THEN
        RAISE EXCEPTION 'model % does not embed query images yet', p_model
            USING HINT = 'attach it to an image table with imgembed.add_model()', ERRCODE = 'undefined_object';
    END IF;
    v_state := imgembed._image_state(v_hash, p_location, p_model);
    IF v_state.query_id IS NULL OR (p_image IS NULL AND v_state.error IS NOT NULL) THEN
        IF NOT imgembed._request_image_elsewhere(p_image, p_location) THEN
            IF v_state.query_id IS NULL THEN
                RAISE EXCEPTION '% has not been requested yet', v_what
                    USING HINT = 'run SELECT imgembed.request_image(...) (or request_image_at) in its own transaction '
                                 'first, or install the dblink extension so search_image can do it',
                          ERRCODE = 'object_not_in_prerequisite_state';
            END IF;
        END IF;
    END IF;
    LOOP
        v_state := imgembed._image_state(v_hash, p_location, p_model);
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/66_hybrid.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Hybrid search: PostgreSQL's full-text ranking over a table's own text columns, fused with CLIP's
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
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/70_models.sql as released with revision 0011
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
     WHERE wm.model_id = v_model.id AND wm.is_default AND w.tbl <> ALL (imgembed._query_tables()) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'model % is still the default of table %', model, v_table
            USING HINT = 'switch that table to another model first with imgembed.use_model()',
                  ERRCODE = 'object_in_use';
    END IF;
    FOR v_table IN
        SELECT w.tbl FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id WHERE wm.model_id = v_model.id
    LOOP
        -- On query tables the default follows the image tables: hand it to another model, if any.
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

-- The checksum of the checkpoint a model was registered with (NULL: none recorded), for workers,
-- which may read no table themselves.
CREATE OR REPLACE FUNCTION imgembed.model_checksum(p_name text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT m.sha256 FROM imgembed.model m WHERE m.name = p_name
$$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/80_clusters.sql as released with revision 0011
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

-- Ask for a clustering of a table's vectors: k-means with k clusters, or k chosen by silhouette
-- when NULL; HDBSCAN chooses its clusters itself (k must be NULL). Returns the run id;
-- imgembed.cluster_run shows its status.
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
    IF k IS NOT NULL AND method = 'hdbscan' THEN
        RAISE EXCEPTION 'hdbscan finds the number of clusters itself: k must be NULL'
            USING HINT = 'leave k out, or use method => ''kmeans'' for k clusters', ERRCODE = 'invalid_parameter_value';
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
        SELECT r.id, w.*, w.id AS watch_id, m.name AS model_name, r.method AS run_method
          FROM imgembed.cluster_run r JOIN imgembed._live_watch w ON w.id = r.watch_id JOIN imgembed.model m ON m.id = r.model_id
         WHERE r.status = 'done' AND has_table_privilege(w.tbl, 'SELECT') ORDER BY r.id
    LOOP
        RETURN QUERY EXECUTE format(
            'SELECT c.run_id, $2, $3, $4, c.cluster, c.size, '
            '       CASE WHEN imgembed._row_visible($5, c.medoid_key) THEN c.medoid_key END, %s'
            '  FROM imgembed.cluster_centre c WHERE c.run_id = $1 ORDER BY c.cluster',
            CASE WHEN v_run.label_column IS NULL THEN 'NULL::jsonb'
                 ELSE format('(SELECT jsonb_object_agg(coalesce(x.label, ''(none)''), x.n) FROM ('
                             ' SELECT s.%I::text AS label, count(*) AS n FROM imgembed.cluster_member mm'
                             ' JOIN %s s ON s.%I = mm.key::%s WHERE mm.run_id = c.run_id AND mm.cluster = c.cluster'
                             ' GROUP BY 1) x)', v_run.label_column, v_run.tbl, v_run.key_column, v_run.key_type) END)
        USING v_run.id, v_run.table_name, v_run.model_name, v_run.run_method, v_run.watch_id;
    END LOOP;
END $$;

-- One row per cluster of every finished run: size, most central row, and the labels inside it
-- (label_mix: label -> count, NULL when the table has no label column). The view spans tables, so
-- medoid keys are text: the function of the same name gives one table's in their type.
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
    v_run := imgembed._finished_run(v_watch, nearest_cluster.run_id);
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = v_watch.id AND wm.model_id = v_run.model_id;
    RETURN QUERY
    SELECT v_run.id, c.cluster, (c.centre::@vector@.vector OPERATOR(@vector@.<=>) imgembed._require_vector(v_watch, v_link, key::text))::float8 AS d
      FROM imgembed.cluster_centre c WHERE c.run_id = v_run.id ORDER BY 3 LIMIT 1;
END $$;

-- A finished run of a table: the one named, else the latest.
CREATE OR REPLACE FUNCTION imgembed._finished_run(p_watch imgembed.watch, p_run_id bigint)
RETURNS imgembed.cluster_run
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run;
BEGIN
    SELECT * INTO v_run FROM imgembed.cluster_run r
     WHERE r.watch_id = p_watch.id AND r.status = 'done' AND (p_run_id IS NULL OR r.id = p_run_id)
     ORDER BY r.id DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no finished clustering run%', p_watch.table_name,
                        coalesce(format(' with id %s', p_run_id), '')
            USING HINT = 'run SELECT imgembed.cluster(table) and let a worker finish it', ERRCODE = 'no_data_found';
    END IF;
    RETURN v_run;
END $$;

-- One table's cluster members with keys in its own type (imgembed.cluster_member spans tables and
-- keeps keys as text): cluster_member('products', NULL::bigint), latest finished run unless one
-- is named; by cluster, then nearest its centre first.
CREATE OR REPLACE FUNCTION imgembed.cluster_member(tbl regclass, key_type anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, key anyelement, cluster integer, distance double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run := imgembed._finished_run(imgembed._watch_of(tbl), run_id);
BEGIN
    RETURN QUERY EXECUTE format('SELECT m.run_id, m.key::%1$s, m.cluster, m.distance FROM imgembed.cluster_member m '
                                'WHERE m.run_id = $1 ORDER BY m.cluster, m.distance, m.key::%1$s', pg_typeof(key_type))
    USING v_run.id;
END $$;

-- One table's cluster summary with the medoid in the key's own type: cluster_summary('products',
-- NULL::bigint), latest finished run unless one is named.
CREATE OR REPLACE FUNCTION imgembed.cluster_summary(tbl regclass, key_type anyelement, run_id bigint DEFAULT NULL)
RETURNS TABLE (run bigint, model text, method text, cluster integer, size integer, medoid_key anyelement,
               label_mix jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_run imgembed.cluster_run := imgembed._finished_run(imgembed._watch_of(tbl), run_id);
BEGIN
    RETURN QUERY EXECUTE format('SELECT s.run_id, s.model, s.method, s.cluster, s.size, s.medoid_key::%s, s.label_mix '
                                'FROM imgembed.cluster_summary s WHERE s.run_id = $1 ORDER BY s.cluster',
                                pg_typeof(key_type))
    USING v_run.id;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/81_anomalies.sql as released with revision 0011
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
    UPDATE imgembed.watch w SET good_column = set_known_good.good_column, good_label = set_known_good.good_label,
           good_attnum = (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = w.tbl
                            AND a.attname = set_known_good.good_column AND NOT a.attisdropped)
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

-- One table's rows not marked good, with their score under the default model and the calibrated
-- threshold; highest scores first. Nothing before calibrate_anomalies() has run for that model.
CREATE OR REPLACE FUNCTION imgembed._table_anomalies(p_watch imgembed.watch)
RETURNS TABLE (key text, model text, score double precision, threshold double precision, is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_link imgembed.watch_model;
    v_limit imgembed.anomaly_threshold;
BEGIN
    SELECT * INTO v_link FROM imgembed.watch_model wm WHERE wm.watch_id = p_watch.id AND wm.is_default;
    SELECT * INTO v_limit FROM imgembed.anomaly_threshold t WHERE t.watch_id = p_watch.id AND t.model_id = v_link.model_id;
    IF v_limit IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT x.id, m.name, x.score, $3, x.score > $3 FROM ('
        '  SELECT e.id AS k, e.id::text AS id, imgembed._anomaly_score($1, $2, e.id::text, e.embedding, $4, false) AS score'
        '    FROM imgembed.%I e JOIN %s s ON s.%I = e.id WHERE NOT coalesce(%s, false)) x'
        '  CROSS JOIN imgembed.model m WHERE m.id = $5 ORDER BY x.score DESC, x.k',
        v_link.storage_table, p_watch.tbl, p_watch.key_column, imgembed._good_sql(p_watch))
    USING p_watch, v_link, v_limit.threshold, v_limit.k, v_link.model_id;
END $$;

CREATE OR REPLACE FUNCTION imgembed._anomalies()
RETURNS TABLE (table_name text, key text, model text, score double precision, threshold double precision,
               is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
BEGIN
    FOR v_watch IN SELECT * FROM imgembed._live_watch w
                    WHERE num_nonnulls(w.good_column, w.good_label) = 1 AND has_table_privilege(w.tbl, 'SELECT')
                    ORDER BY w.table_name LOOP
        RETURN QUERY SELECT v_watch.table_name, a.* FROM imgembed._table_anomalies(v_watch) a;
    END LOOP;
END $$;

-- Every row not marked good, in every table with known-good rows and a calibrated threshold:
-- its score and whether it is over the threshold. Highest scores first. The view spans tables, so
-- keys are text: the function of the same name gives one table's keys in their type.
CREATE OR REPLACE VIEW imgembed.anomalies AS
SELECT * FROM imgembed._anomalies();

-- One table's anomaly scores with keys in its own type: anomalies('parts', NULL::bigint).
CREATE OR REPLACE FUNCTION imgembed.anomalies(tbl regclass, key_type anyelement)
RETURNS TABLE (key anyelement, model text, score double precision, threshold double precision, is_anomaly boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
BEGIN
    IF num_nonnulls(v_watch.good_column, v_watch.good_label) = 0 THEN
        RAISE EXCEPTION 'table % has no known-good rows', v_watch.table_name
            USING HINT = 'mark them with imgembed.set_known_good()', ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN QUERY EXECUTE format('SELECT a.key::%s, a.model, a.score, a.threshold, a.is_anomaly '
                                'FROM imgembed._table_anomalies($1) a', pg_typeof(key_type))
    USING v_watch;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/82_maps.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- 2-D maps of the embedding space: `imgembed map` stores coordinates in imgembed.projection, which
-- spans tables and keeps keys as text.

-- One table's map with keys in its own type: projection('parts', NULL::bigint). The method
-- (pca, tsne, umap) computed last for the model unless one is named; the table's default model
-- unless one is named.
CREATE OR REPLACE FUNCTION imgembed.projection(
    tbl regclass,
    key_type anyelement,
    method text DEFAULT NULL,
    model text DEFAULT NULL
) RETURNS TABLE (key anyelement, x double precision, y double precision, made_with text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_method text := projection.method;
BEGIN
    IF v_method IS NULL THEN
        SELECT p.method INTO v_method FROM imgembed.projection p
         WHERE p.watch_id = v_watch.id AND p.model_id = v_link.model_id ORDER BY p.computed_at DESC LIMIT 1;
    END IF;
    IF v_method IS NULL OR NOT EXISTS (SELECT 1 FROM imgembed.projection p WHERE p.watch_id = v_watch.id
                                          AND p.model_id = v_link.model_id AND p.method = v_method) THEN
        RAISE EXCEPTION 'table % has no map%', v_watch.table_name, coalesce(format(' made with %s', projection.method), '')
            USING HINT = format('draw one: imgembed map %s', v_watch.table_name), ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format('SELECT p.key::%1$s, p.x, p.y, p.method FROM imgembed.projection p '
                                'WHERE p.watch_id = $1 AND p.model_id = $2 AND p.method = $3 ORDER BY p.key::%1$s',
                                pg_typeof(key_type))
    USING v_watch.id, v_link.model_id, v_method;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/85_event_triggers.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Event triggers: a watched table's DDL is followed the moment it happens. Renames need nothing
-- (08_live_watch.sql); a dropped table or image column stops its watch (vectors and jobs go); a key
-- or image column changed to another type is refused, with what to do instead. Only a superuser
-- may create event triggers: where the migrating role is not one, `imgembed doctor --fix` (or
-- imgembed.repair_watches()) does the same afterwards, and a DBA may install them (the NOTICE
-- below says how). Until repaired, a broken watch is left out of everything else.

-- After ALTER TABLE on a watched table (or CREATE TABLE of a partition of one): refuse a retyped
-- key or image column, follow the rest (a new, attached or detached partition included).
CREATE OR REPLACE FUNCTION imgembed._on_ddl_end()
RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch;
    v_problem text;
BEGIN
    FOR v_watch IN
        SELECT w.* FROM imgembed.watch w
         WHERE w.tbl::oid IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() c
                               WHERE c.classid = 'pg_class'::regclass
                              UNION  -- a partition's ancestors (none for a table outside a partition tree)
                              SELECT a.relid FROM pg_event_trigger_ddl_commands() c
                               CROSS JOIN LATERAL pg_partition_ancestors(c.objid) a
                               WHERE c.classid = 'pg_class'::regclass)
    LOOP
        v_problem := imgembed._watch_problem(v_watch);
        IF v_problem LIKE '% is now %' THEN
            RAISE EXCEPTION 'imgembed watches %: its % (that would break its vectors)', v_watch.tbl, v_problem
                USING HINT = format('stop watching it first: SELECT imgembed.unwatch(%L); then change the column '
                                    'and watch it again (every row is embedded again)', v_watch.tbl::text),
                      ERRCODE = 'object_in_use';
        END IF;
    END LOOP;
    IF FOUND THEN
        PERFORM imgembed.repair_watches();
    END IF;
END $$;

-- After DROP TABLE / DROP SCHEMA ... CASCADE or ALTER TABLE ... DROP COLUMN of a watched table:
-- its watch stops (or forgets a dropped label column).
CREATE OR REPLACE FUNCTION imgembed._on_sql_drop()
RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d
                WHERE d.classid = 'pg_class'::regclass AND d.objid IN (SELECT w.tbl::oid FROM imgembed.watch w)) THEN
        PERFORM imgembed.repair_watches();
    END IF;
END $$;

DO $$
BEGIN
    IF (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        -- Made again at every upgrade, so that they fire on the commands this release follows.
        DROP EVENT TRIGGER IF EXISTS imgembed_ddl_end;
        DROP EVENT TRIGGER IF EXISTS imgembed_sql_drop;
        CREATE EVENT TRIGGER imgembed_ddl_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
            EXECUTE FUNCTION imgembed._on_ddl_end();
        CREATE EVENT TRIGGER imgembed_sql_drop ON sql_drop
            WHEN TAG IN ('ALTER TABLE', 'DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
            EXECUTE FUNCTION imgembed._on_sql_drop();
    ELSIF (SELECT count(*) FROM pg_event_trigger WHERE evtname IN ('imgembed_ddl_end', 'imgembed_sql_drop')) < 2 THEN
        RAISE NOTICE 'imgembed: event triggers need a superuser, so changes to watched tables are not followed at '
                     'once: after dropping or retyping a watched table''s columns, run `imgembed doctor --fix`. '
                     'A superuser may install them in this database: CREATE EVENT TRIGGER imgembed_ddl_end ON '
                     'ddl_command_end WHEN TAG IN (''ALTER TABLE'', ''CREATE TABLE'') EXECUTE FUNCTION imgembed._on_ddl_end(); '
                     'CREATE EVENT TRIGGER imgembed_sql_drop ON sql_drop WHEN TAG IN (''ALTER TABLE'', '
                     '''DROP TABLE'', ''DROP SCHEMA'', ''DROP OWNED'') EXECUTE FUNCTION imgembed._on_sql_drop();';
    END IF;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/90_pin_search_path.sql as released with revision 0011
DO $imgembed_definition$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF v_vector_schema IS NULL THEN
        RAISE EXCEPTION 'imgembed needs the pgvector extension in this database'
            USING HINT = 'a superuser runs: CREATE EXTENSION vector;';
    END IF;
    EXECUTE replace($imgembed_sql$-- Pin the search_path of every imgembed function (applied after the others): names resolve in
-- pg_catalog and imgembed only, schemas no other role may create objects in, never in what a
-- caller put first nor in the schema holding pgvector (a public one, often): pgvector's objects
-- are named in their schema (@vector@.vector, OPERATOR(@vector@.<=>)), and with their exact
-- argument types, so that no object another role creates there is ever chosen instead.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, imgembed, pg_temp', v_function);
    END LOOP;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;

-- sql/95_roles.sql as released with revision 0011
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
--   imgembed_reader: the search functions and views, which show a role only the rows of watched
--                    tables it may SELECT (privileges and row-level security carry over); it
--                    changes nothing, but may queue a text (request_text) and keep its own
--                    interactions (likes, dislikes), which no other role sees.
--   imgembed_worker: claims jobs, reads the claimed rows' image columns, writes vectors, all
--                    through SECURITY DEFINER functions; no direct access to any table.
--   imgembed_text_<database oid>: the login of the loopback connection of search_text and
--                    search_image in this database; it may only queue a text or a query image.
--                    Its password is made here, and kept where only the owner reads it.
-- The application's own roles keep their rights and need nothing of imgembed to write watched
-- tables. SECURITY DEFINER functions run as the role that ran the migration: run migrations as
-- the database's owner role, not as a superuser. Roles belong to the whole cluster: created here
-- when the migrating role may (CREATEROLE); otherwise a NOTICE says what a DBA must run.
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

-- The loopback login of search_text in this database. Its password is made once and kept: copies
-- of this database (CREATE DATABASE ... TEMPLATE) share the role and the password; a database
-- restored where the role is missing gets it back with the password it kept.
DO $$
DECLARE
    v_role text := imgembed._text_request_role();
    v_password text := (SELECT s.value FROM imgembed.private_setting s WHERE s.name = 'text_request_password');
BEGIN
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            v_password := coalesce(v_password, replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
            EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', v_role, v_password);
        ELSIF v_password IS NULL THEN
            v_password := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
            EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', v_role, v_password);
        END IF;
        INSERT INTO imgembed.private_setting (name, value)
        VALUES ('text_request_role', v_role), ('text_request_password', v_password)
        ON CONFLICT (name) DO UPDATE SET value = excluded.value;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'imgembed: cannot create role % (%); search_text of a new text then needs '
                     'imgembed.request_text() in its own transaction first', v_role, SQLERRM;
    END;
END $$;

-- Functions that run as their owner, and who may call them.
DO $$
DECLARE
    v_function regprocedure;
    v_callers text[];
    v_role_name text;
BEGIN
    FOR v_function, v_callers IN
        SELECT p.oid::regprocedure,
               CASE WHEN p.proname IN ('request_text', 'request_image', 'request_image_at') THEN ARRAY['imgembed_reader', imgembed._text_request_role()]
                    WHEN p.proname IN ('_text_state', '_request_text_elsewhere', '_image_state', '_request_image_elsewhere')
                         THEN ARRAY['imgembed_reader']
                    WHEN p.proname IN ('_on_insert', '_on_update', '_on_delete', '_on_truncate', '_on_truncate_partition',
                                       '_on_replicated_row', '_on_ddl_end', '_on_sql_drop') THEN ARRAY[]::text[]
                    ELSE ARRAY['imgembed_worker'] END
          FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN (
               -- the worker's and the dispatcher's
               'expand_intake', 'claim_batch', 'start_claim', 'release_claim', 'recover_expired', 'in_flight_count',
               'claimed_images', 'finish_batch', 'vectors_by_content', 'requeue_claim', 'backlog', 'claim_cluster_run', 'cluster_run_spec',
               'cluster_input', 'finish_cluster_run', 'fail_cluster_run', 'worker_beat', 'model_checksum',
               -- the triggers on watched tables, and the event triggers: nobody calls them, they fire
               '_on_insert', '_on_update', '_on_delete', '_on_truncate', '_on_truncate_partition', '_on_replicated_row',
               '_on_ddl_end', '_on_sql_drop',
               -- texts and query images, which no reader may list
               'request_text', '_text_state', '_request_text_elsewhere',
               'request_image', 'request_image_at', '_image_state', '_request_image_elsewhere')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
        FOREACH v_role_name IN ARRAY v_callers LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role_name) THEN
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_function, v_role_name);
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- Rows of imgembed's own tables that name rows of watched tables: a role sees those of the tables
-- it may read. Vector tables go further, row by row (imgembed._secure_storage). The owner sees all.
DO $$
DECLARE
    v_table text;
    v_link record;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['job', 'intake', 'cluster_run', 'anomaly_threshold', 'cluster_centre'] LOOP
        EXECUTE format('ALTER TABLE imgembed.%I ENABLE ROW LEVEL SECURITY', v_table);
        EXECUTE format('DROP POLICY IF EXISTS readable_tables ON imgembed.%I', v_table);
        EXECUTE format('CREATE POLICY readable_tables ON imgembed.%I FOR SELECT USING (imgembed._table_readable(%s))',
                       v_table, CASE v_table WHEN 'cluster_centre'
                                     THEN '(SELECT r.watch_id FROM imgembed.cluster_run r WHERE r.id = run_id)'
                                     ELSE 'watch_id' END);
    END LOOP;
    -- Cluster members and map coordinates name rows one by one: a role sees those it may read.
    ALTER TABLE imgembed.cluster_member ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.cluster_member;
    DROP POLICY IF EXISTS visible_rows ON imgembed.cluster_member;
    CREATE POLICY visible_rows ON imgembed.cluster_member FOR SELECT
        USING (imgembed._row_visible((SELECT r.watch_id FROM imgembed.cluster_run r WHERE r.id = run_id), key));
    ALTER TABLE imgembed.projection ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS readable_tables ON imgembed.projection;
    DROP POLICY IF EXISTS visible_rows ON imgembed.projection;
    CREATE POLICY visible_rows ON imgembed.projection FOR SELECT USING (imgembed._row_visible(watch_id, key));
    -- Interactions (likes, purchases...) are each role's own.
    ALTER TABLE imgembed.interaction ENABLE ROW LEVEL SECURITY;
    DROP POLICY IF EXISTS own_rows ON imgembed.interaction;
    CREATE POLICY own_rows ON imgembed.interaction USING (role_name = current_user) WITH CHECK (role_name = current_user);
    FOR v_link IN SELECT w AS watch, wm.storage_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
    LOOP
        PERFORM imgembed._secure_storage(v_link.watch, v_link.storage_table);
    END LOOP;
END $$;

-- Schema and table privileges.
DO $$
BEGIN
    REVOKE ALL ON SCHEMA imgembed FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_worker') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = imgembed._text_request_role()) THEN
        EXECUTE format('GRANT USAGE ON SCHEMA imgembed TO %I', imgembed._text_request_role());
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgembed_reader') THEN
        GRANT USAGE ON SCHEMA imgembed TO imgembed_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA imgembed TO imgembed_reader;
        -- Not for readers: Alembic's bookkeeping, the owner's settings, everyone's texts and query
        -- images, and the heartbeats (imgembed.workers shows them).
        REVOKE SELECT ON imgembed.alembic_version, imgembed.private_setting, imgembed.text_query,
                         imgembed.image_query, imgembed.worker_heartbeat FROM imgembed_reader;
        GRANT INSERT, DELETE ON imgembed.interaction TO imgembed_reader;
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA imgembed TO imgembed_reader;
    END IF;
END $$;
$imgembed_sql$, '@vector@', v_vector_schema);
END $imgembed_definition$;
