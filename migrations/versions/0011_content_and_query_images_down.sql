-- Revision 0011, downgrade: back to revision 0010. Query images (imgembed.image_query, its watch and
-- vectors), the content hashes beside vectors, hybrid search, backlog() and model.text_tower go
-- (image-only models stay registered), and revision 0010's definitions (sql/ as released with it)
-- are applied again, making the earlier forms of finish_batch, claimed_images and register_model.
DO $$
DECLARE
    v_storage text;
    v_function regprocedure;
BEGIN
    IF EXISTS (SELECT 1 FROM imgembed.watch w WHERE w.tbl = 'imgembed.image_query'::regclass) THEN
        PERFORM imgembed.unwatch('imgembed.image_query');
    END IF;
    FOR v_storage IN SELECT wm.storage_table FROM imgembed.watch_model wm ORDER BY wm.storage_table LOOP
        EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_storage || '_content');
        EXECUTE format('ALTER TABLE imgembed.%I DROP COLUMN IF EXISTS content_sha256', v_storage);
    END LOOP;
    FOR v_function IN SELECT p.oid::regprocedure FROM pg_proc p
                       WHERE p.pronamespace = 'imgembed'::regnamespace
                         AND p.proname IN ('finish_batch', 'claimed_images', 'register_model', 'backlog', '_job_counts',
                                           '_require_text_model', 'vectors_by_content', '_query_tables', '_request_elsewhere',
                                           '_check_waiting', 'request_image', 'request_image_at', '_image_state',
                                           '_request_image_elsewhere', '_query_image_vector', 'image_vector',
                                           '_search_image', 'search_image', 'search_image_at', '_text_tsvector_sql',
                                           'search_hybrid')
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_function);
    END LOOP;
END $$;
DROP TABLE imgembed.image_query;
ALTER TABLE imgembed.model DROP COLUMN text_tower;
--@definitions 0010
