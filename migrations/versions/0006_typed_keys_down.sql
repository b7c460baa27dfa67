-- Revision 0006, downgrade: back to revision 0005. The functions added or changed since go, and
-- revision 0005's definitions (sql/ as released with it) are applied again.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND (p.proname IN ('storage_table', 'zero_shot', '_pending_prompt_labels', '_table_predicted_labels',
                              'predicted_labels', '_table_anomalies', 'anomalies', '_finished_run', 'cluster_member',
                              'cluster_summary', 'projection')
                OR (p.proname IN ('similar', 'similar_to_vector', 'search_text')
                    AND 'anycompatible'::regtype = ANY (p.proargtypes::oid[]))
                OR (p.proname IN ('near_duplicates', 'recommend_for_user')
                    AND 'anyelement'::regtype = ANY (p.proargtypes::oid[])))
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;

--@definitions 0005
