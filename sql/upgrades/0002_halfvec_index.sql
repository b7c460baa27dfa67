-- Revision 0002, upgrade: vector tables of databases made before it get the half-precision HNSW
-- index and, up to 1,536 dimensions, vectors stored in the row (imgembed._attach_model does both
-- for new tables). VACUUM FULL cannot run inside the migration's transaction, so every row is
-- rewritten with a fresh copy of its vector, which PLAIN storage then keeps in the row.
DO $$
DECLARE
    v_table record;
BEGIN
    FOR v_table IN
        SELECT wm.storage_table, m.dim FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
    LOOP
        IF v_table.dim <= 1536 THEN
            EXECUTE format('ALTER TABLE imgembed.%I ALTER COLUMN embedding SET STORAGE PLAIN', v_table.storage_table);
        END IF;
        EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', v_table.storage_table || '_hnsw');
        IF v_table.dim <= 1536 THEN
            EXECUTE format('UPDATE imgembed.%I SET embedding = embedding::real[]::vector', v_table.storage_table);
        END IF;
        PERFORM imgembed._create_index(v_table.storage_table, v_table.dim);
    END LOOP;
END $$;
