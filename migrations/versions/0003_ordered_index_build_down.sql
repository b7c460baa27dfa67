-- Revision 0003, downgrade: frozen as released (the SQL imgembed ran at commit 37b593d).
-- A released revision never changes: later changes go into a new revision, and functions
-- and views into sql/, which every upgrade to the newest revision applies again.

-- Revision 0003, downgrade: HNSW builds start where the last scan of the table stopped again.
ALTER FUNCTION imgembed._create_index(text, integer, integer, integer) RESET synchronize_seqscans;
