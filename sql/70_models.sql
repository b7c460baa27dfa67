-- Model lifecycle per watched table: backfill a new model beside the current one (add_model, in
-- 20_watch.sql), switch the default atomically once it is complete, drop the old one.

-- Rows still to embed for (table, model), queued or running: a backfill is complete at 0.
CREATE OR REPLACE FUNCTION imgembed._unfinished_jobs(p_watch_id integer, p_model_id integer)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM imgembed.job
             WHERE watch_id = p_watch_id AND model_id = p_model_id AND status IN ('pending', 'in_flight'))
         + (SELECT coalesce(sum(cardinality(keys)), 0) FROM imgembed.intake
             WHERE watch_id = p_watch_id AND (model_id IS NULL OR model_id = p_model_id))
$$;

-- Make `model` the table's default: queries without a model use it from the next statement on.
-- Refused while its backfill is incomplete, unless force.
CREATE OR REPLACE FUNCTION imgembed.use_model(tbl regclass, model text, force boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
    v_unfinished bigint := imgembed._unfinished_jobs(v_watch.id, v_link.model_id);
    v_reduced imgembed.model := imgembed._model_named(use_model.model);
BEGIN
    IF v_reduced.derived_from IS NOT NULL AND NOT force THEN
        PERFORM imgembed._reduction_source(use_model.model);  -- refused while not fitted
        v_unfinished := imgembed._unfinished_jobs(v_watch.id, v_reduced.derived_from);  -- rows its source has yet to embed
    END IF;
    IF v_unfinished > 0 AND NOT force THEN
        RAISE EXCEPTION 'model % is still backfilling table % (% rows to go)', model, v_watch.table_name, v_unfinished
            USING HINT = 'wait for it (imgembed models add --wait, or imgembed.status), or force it: '
                         'imgembed models use TABLE MODEL --force (in SQL, force => true)',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Lock the table's links so concurrent switches serialise; two updates keep the
    -- one-default-per-table index satisfied at every step.
    PERFORM 1 FROM imgembed.watch_model WHERE watch_id = v_watch.id FOR UPDATE;
    UPDATE imgembed.watch_model SET is_default = false WHERE watch_id = v_watch.id AND is_default;
    UPDATE imgembed.watch_model SET is_default = true WHERE watch_id = v_watch.id AND model_id = v_link.model_id;
END $$;

-- Stop embedding a table with `model`: its vectors, index and jobs go. The default cannot be
-- dropped: switch first with use_model().
CREATE OR REPLACE FUNCTION imgembed.drop_model(tbl regclass, model text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_link imgembed.watch_model := imgembed._watch_model_of(v_watch, model);
BEGIN
    IF v_link.is_default THEN
        RAISE EXCEPTION 'model % is the default of table %', model, v_watch.table_name
            USING HINT = 'make another model the default first: imgembed.use_model(table, other_model)',
                  ERRCODE = 'object_in_use';
    END IF;
    IF EXISTS (SELECT 1 FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
                WHERE wm.watch_id = v_watch.id AND m.derived_from = v_link.model_id) THEN
        RAISE EXCEPTION 'reduced model % of table % projects the vectors of model %',
                        (SELECT min(m.name) FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
                          WHERE wm.watch_id = v_watch.id AND m.derived_from = v_link.model_id), v_watch.table_name, model
            USING HINT = 'drop the reduced model first: imgembed.drop_model(table, reduced_model)', ERRCODE = 'object_in_use';
    END IF;
    PERFORM imgembed._delete_jobs(v_watch.id, v_link.model_id);
    EXECUTE format('DROP TABLE IF EXISTS imgembed.%I', v_link.storage_table);
    DELETE FROM imgembed.watch_model WHERE watch_id = v_watch.id AND model_id = v_link.model_id;
END $$;

-- Remove a model everywhere (its vectors on every table, and the registry row). Refused while it
-- is the default of some table.
CREATE OR REPLACE FUNCTION imgembed.forget_model(model text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model := imgembed._model_named(model);
    v_table regclass;
BEGIN
    IF EXISTS (SELECT 1 FROM imgembed.model m WHERE m.derived_from = v_model.id) THEN
        RAISE EXCEPTION 'model % is the source of reduced model %', model,
                        (SELECT min(m.name) FROM imgembed.model m WHERE m.derived_from = v_model.id)
            USING HINT = 'forget the reduced models first: imgembed.forget_model(reduced_model)', ERRCODE = 'object_in_use';
    END IF;
    SELECT w.tbl INTO v_table FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id
     WHERE wm.model_id = v_model.id AND wm.is_default AND w.tbl <> ALL (imgembed._query_tables()) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'model % is still the default of table %', model, v_table
            USING HINT = 'switch that table to another model first with imgembed.use_model()',
                  ERRCODE = 'object_in_use';
    END IF;
    FOR v_table IN
        SELECT w.tbl FROM imgembed.watch w JOIN imgembed.watch_model wm ON wm.watch_id = w.id WHERE wm.model_id = v_model.id
    LOOP
        -- On query tables the default follows the image tables: hand it to another model, if any.
        UPDATE imgembed.watch_model SET is_default = false
         WHERE model_id = v_model.id AND watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table);
        UPDATE imgembed.watch_model SET is_default = true
         WHERE (watch_id, model_id) = (
             SELECT o.watch_id, min(o.model_id) FROM imgembed.watch_model o
              WHERE o.watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table) AND o.model_id <> v_model.id
              GROUP BY o.watch_id)
           AND NOT EXISTS (SELECT 1 FROM imgembed.watch_model d
                            WHERE d.watch_id = (SELECT id FROM imgembed.watch WHERE tbl = v_table) AND d.is_default);
        PERFORM imgembed.drop_model(v_table, model);
    END LOOP;
    DELETE FROM imgembed.model WHERE id = v_model.id;
END $$;

-- The checksum of the checkpoint a model was registered with (NULL: none recorded), for workers,
-- which may read no table themselves.
CREATE OR REPLACE FUNCTION imgembed.model_checksum(p_name text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT m.sha256 FROM imgembed.model m WHERE m.name = p_name
$$;
