-- Revision 0008, downgrade: back to revision 0007. The views reading watches go (they are made again
-- below, without the table's OID), the watches forget their tables' OIDs, and revision 0007's
-- definitions (sql/ as released with it) are applied again.
DROP VIEW IF EXISTS imgembed._live_watch CASCADE;
DROP FUNCTION IF EXISTS imgembed._attnum(imgembed.watch, smallint);
ALTER TABLE imgembed.watch DROP COLUMN tbl_oid;
--@definitions 0007
