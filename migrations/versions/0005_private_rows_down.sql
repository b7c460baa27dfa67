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

--@definitions 0004

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

