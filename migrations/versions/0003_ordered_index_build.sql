-- Revision 0003, upgrade: frozen as released (the SQL imgembed ran at commit 37b593d).
-- A released revision never changes: later changes go into a new revision, and functions
-- and views into sql/, which every upgrade to the newest revision applies again.

-- Revision 0003: HNSW builds read the vector table from its first page, whatever scans ran before
-- (see imgembed._create_index in 20_watch.sql).
ALTER FUNCTION imgembed._create_index(text, integer, integer, integer) SET synchronize_seqscans = off;
