-- Revision 0003: HNSW builds read the vector table from its first page, whatever scans ran before
-- (see imgembed._create_index in 20_watch.sql).
ALTER FUNCTION imgembed._create_index(text, integer, integer, integer) SET synchronize_seqscans = off;
