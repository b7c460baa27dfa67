-- Watched tables change under imgembed: columns and tables are renamed, moved to another schema,
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
