-- Revision 0007, downgrade: back to revision 0006. The event triggers go (only a superuser may drop
-- them), then the view of live watches and what uses it, revision 0006's definitions (sql/ as
-- released with it) are applied again, and the watches forget their columns' numbers.
DO $$
BEGIN
    DROP EVENT TRIGGER IF EXISTS imgembed_ddl_end;
    DROP EVENT TRIGGER IF EXISTS imgembed_sql_drop;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'imgembed''s event triggers can only be dropped by a superuser'
        USING HINT = 'ask one to run: DROP EVENT TRIGGER imgembed_ddl_end; DROP EVENT TRIGGER imgembed_sql_drop; '
                     'then downgrade again';
END $$;
DROP VIEW IF EXISTS imgembed.watch_problems;

--@definitions 0006

DROP VIEW IF EXISTS imgembed._live_watch;
DROP FUNCTION IF EXISTS imgembed._on_ddl_end();
DROP FUNCTION IF EXISTS imgembed._on_sql_drop();
DROP FUNCTION IF EXISTS imgembed.repair_watches();
DROP FUNCTION IF EXISTS imgembed._drop_watch(imgembed.watch);
DROP FUNCTION IF EXISTS imgembed._watch_problem(imgembed.watch);
DROP FUNCTION IF EXISTS imgembed._column_type(regclass, text);
DROP FUNCTION IF EXISTS imgembed._column_name(regclass, smallint, text);
ALTER TABLE imgembed.watch
    DROP COLUMN key_attnum,
    DROP COLUMN content_attnum,
    DROP COLUMN uri_attnum,
    DROP COLUMN text_attnum,
    DROP COLUMN label_attnum,
    DROP COLUMN good_attnum;
