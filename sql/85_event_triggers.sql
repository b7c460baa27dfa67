-- Event triggers: a watched table's DDL is followed the moment it happens. Renames need nothing
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
