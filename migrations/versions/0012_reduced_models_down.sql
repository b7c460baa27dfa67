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
--@definitions 0011
