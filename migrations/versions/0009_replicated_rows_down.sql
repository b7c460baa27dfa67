-- Revision 0009, downgrade: back to revision 0008. The row triggers of replicated watches go, their
-- TRUNCATE triggers fire on local writes alone again, the watches forget the setting, and revision
-- 0008's definitions (sql/ as released with it) are applied again.
DO $$
DECLARE
    v_rel regclass;
BEGIN
    FOR v_rel IN SELECT t.tgrelid::regclass FROM pg_trigger t
                  WHERE t.tgname = 'imgembed_replicated_row' AND t.tgfoid = 'imgembed._on_replicated_row'::regproc
    LOOP
        EXECUTE format('DROP TRIGGER imgembed_replicated_row ON %s', v_rel);
    END LOOP;
    FOR v_rel IN SELECT t.tgrelid::regclass FROM pg_trigger t
                  WHERE t.tgname = 'imgembed_truncate' AND t.tgenabled = 'A'
                    AND t.tgfoid IN ('imgembed._on_truncate'::regproc, 'imgembed._on_truncate_partition'::regproc)
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER imgembed_truncate', v_rel);
    END LOOP;
END $$;
DROP FUNCTION imgembed._on_replicated_row();
DROP VIEW IF EXISTS imgembed._live_watch CASCADE;
DROP FUNCTION IF EXISTS imgembed.watch(regclass, text, text, text, boolean);
DROP FUNCTION IF EXISTS imgembed._watch(regclass, text, text, text, text, text, boolean);
ALTER TABLE imgembed.watch DROP COLUMN replicated;
--@definitions 0008
