-- Revision 0003, downgrade: HNSW builds start where the last scan of the table stopped again.
ALTER FUNCTION imgembed._create_index(text, integer, integer, integer) RESET synchronize_seqscans;
