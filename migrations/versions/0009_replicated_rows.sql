-- Revision 0009, upgrade: a watch may embed the rows a logical replication subscription applies to
-- its table (watch(..., replicated => true)): it remembers that setting. watch() and _watch() take
-- it as one more argument, so their earlier forms go.
ALTER TABLE imgembed.watch ADD COLUMN replicated boolean NOT NULL DEFAULT false;
DROP FUNCTION IF EXISTS imgembed.watch(regclass, text, text, text);
DROP FUNCTION IF EXISTS imgembed._watch(regclass, text, text, text, text, text);
