-- 2-D maps of the embedding space: `imgembed map` stores coordinates in imgembed.projection, which
-- spans tables and keeps keys as text.

-- One table's map with keys in its own type: projection('parts', NULL::bigint). The method
-- (pca, tsne, umap) computed last for the model unless one is named; the table's default model
-- unless one is named.
CREATE OR REPLACE FUNCTION imgembed.projection(
    tbl regclass,
    key_type anyelement,
    method text DEFAULT NULL,
    model text DEFAULT NULL
) RETURNS TABLE (key anyelement, x double precision, y double precision, made_with text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_method text := projection.method;
BEGIN
    IF v_method IS NULL THEN
        SELECT p.method INTO v_method FROM imgembed.projection p
         WHERE p.watch_id = v_watch.id AND p.model_id = v_link.model_id ORDER BY p.computed_at DESC LIMIT 1;
    END IF;
    IF v_method IS NULL OR NOT EXISTS (SELECT 1 FROM imgembed.projection p WHERE p.watch_id = v_watch.id
                                          AND p.model_id = v_link.model_id AND p.method = v_method) THEN
        RAISE EXCEPTION 'table % has no map%', v_watch.table_name, coalesce(format(' made with %s', projection.method), '')
            USING HINT = format('draw one: imgembed map %s', v_watch.table_name), ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format('SELECT p.key::%1$s, p.x, p.y, p.method FROM imgembed.projection p '
                                'WHERE p.watch_id = $1 AND p.model_id = $2 AND p.method = $3 ORDER BY p.key::%1$s',
                                pg_typeof(key_type))
    USING v_watch.id, v_link.model_id, v_method;
END $$;
