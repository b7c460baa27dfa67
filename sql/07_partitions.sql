-- Partitioned tables. A write fires the statement triggers of the table it names only: the parent's
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
        CONTINUE WHEN (SELECT m.derived_from IS NOT NULL FROM imgembed.model m WHERE m.id = v_link.model_id);
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
