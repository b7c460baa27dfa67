-- Revision 0013, downgrade: back to revision 0012. Who asked for what is forgotten, with every
-- function that revision 0013's definitions added or gave new arguments; revision 0012's
-- definitions come back.
DROP TABLE imgembed.query_request;
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'imgembed'::regnamespace
           AND p.proname IN ('_text_state', '_request_text_elsewhere', '_request_text', '_image_state',
                             '_request_image_elsewhere', '_request_image', '_may_request_as', '_record_request',
                             '_check_requests', '_query_limits', '_query_table', '_query_watch_id',
                             '_drop_unrequested', 'forget_queries', '_forget_queries', 'expire_queries')
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;
--@definitions 0012
