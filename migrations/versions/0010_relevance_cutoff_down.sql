-- Revision 0010, downgrade: back to revision 0009. The search functions with max_distance go, and
-- revision 0009's definitions (sql/ as released with it) are applied again, making their earlier forms.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN SELECT p.oid::regprocedure FROM pg_proc p
                       WHERE p.pronamespace = 'imgembed'::regnamespace
                         AND p.proname IN ('_knn', 'similar', 'similar_to_vector', 'search_text', 'similarity_join',
                                           '_recommend', 'recommend', 'recommend_for_user')
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;
--@definitions 0009
