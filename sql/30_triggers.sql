-- Statement-level triggers on watched tables. They run in the writer's transaction, enqueue one
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
