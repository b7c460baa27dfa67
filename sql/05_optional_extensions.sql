-- dblink lets search_text() enqueue a never-seen text in a transaction of its own. It is
-- optional: without it (or without the right to create it) search_text asks the caller to run
-- imgembed.request_text() first.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS dblink;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'imgembed: dblink not installed (%); search_text needs request_text() first', SQLERRM;
END $$;
