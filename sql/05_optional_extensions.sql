-- dblink lets search_text() enqueue a never-seen text in a transaction of its own (see
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
