-- Revision 0006, upgrade: keys in their own type. The functions whose signature changes are
-- dropped here; sql/ defines them again (similar and the key_type overloads take after_id in the
-- key's type, zero_shot waits for pending prompts, storage_table returns a regclass).
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND (p.proname IN ('storage_table', 'zero_shot')
                OR (p.proname IN ('similar', 'similar_to_vector', 'search_text')
                    AND 'anyelement'::regtype = ANY (p.proargtypes::oid[])))
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;
