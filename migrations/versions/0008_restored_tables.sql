-- Revision 0008, upgrade: a watch remembers its table's OID. A table restored from a dump has
-- another OID and may number its columns anew (dropped columns leave gaps that a dump does not
-- keep): where the OID differs, the watch finds its columns by name again.
ALTER TABLE imgembed.watch ADD COLUMN tbl_oid oid;
UPDATE imgembed.watch w SET tbl_oid = w.tbl::oid WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.tbl);
