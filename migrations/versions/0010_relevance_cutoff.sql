-- Revision 0010, upgrade: the search functions (similar, similar_to_vector, search_text,
-- similarity_join, recommend, recommend_for_user and the _knn and _recommend under them) take
-- max_distance, one more argument: their earlier forms go here, and the definitions in sql/ make
-- the new ones.
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
