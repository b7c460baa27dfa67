-- Revision 0007, upgrade: a watch knows its columns by number as well as by name, so that it
-- follows the application's RENAME COLUMN / RENAME TABLE / SET SCHEMA, and sees DROP COLUMN.
ALTER TABLE imgembed.watch
    ADD COLUMN key_attnum smallint,
    ADD COLUMN content_attnum smallint,
    ADD COLUMN uri_attnum smallint,
    ADD COLUMN text_attnum smallint,
    ADD COLUMN label_attnum smallint,
    ADD COLUMN good_attnum smallint;

UPDATE imgembed.watch w
   SET key_attnum = (SELECT a.attnum FROM pg_attribute a
                      WHERE a.attrelid = w.tbl AND a.attname = w.key_column AND NOT a.attisdropped),
       content_attnum = (SELECT a.attnum FROM pg_attribute a
                          WHERE a.attrelid = w.tbl AND a.attname = w.content_column AND NOT a.attisdropped),
       uri_attnum = (SELECT a.attnum FROM pg_attribute a
                      WHERE a.attrelid = w.tbl AND a.attname = w.uri_column AND NOT a.attisdropped),
       text_attnum = (SELECT a.attnum FROM pg_attribute a
                       WHERE a.attrelid = w.tbl AND a.attname = w.text_column AND NOT a.attisdropped),
       label_attnum = (SELECT a.attnum FROM pg_attribute a
                        WHERE a.attrelid = w.tbl AND a.attname = w.label_column AND NOT a.attisdropped),
       good_attnum = (SELECT a.attnum FROM pg_attribute a
                       WHERE a.attrelid = w.tbl AND a.attname = w.good_column AND NOT a.attisdropped)
 WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.tbl);
