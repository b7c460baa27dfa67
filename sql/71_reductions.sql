-- Reduced models: fewer dimensions for a table's vectors. imgembed.reduce() registers a model
-- derived from the table's model, a worker fits PCA on the table's vectors (scikit-learn), and the
-- projected vectors get a vector table and an index of their own. The axes are the principal
-- components and the direction of the vectors' mean: cosine similarity of the projections then
-- ranks rows as the source model's does (centred projections would not: CLIP vectors share a
-- large common part, and dropping it changes which rows are nearest). Workers never embed with a
-- reduced model: every vector its source model writes is projected in the same transaction
-- (finish_batch), and queries (texts, query images, vectors) are projected when they are asked.

-- The projection of a source model's vector by a reduced model's fit: its coordinate along each
-- axis, as a unit vector. NULL while the model is not fitted.
CREATE OR REPLACE FUNCTION imgembed._project(p_model_id integer, p_vec @vector@.vector)
RETURNS @vector@.vector
LANGUAGE sql STABLE AS $$
    SELECT @vector@.l2_normalize(
               array_agg(-(p_vec OPERATOR(@vector@.<#>) a.direction) ORDER BY a.axis)::@vector@.vector)
      FROM imgembed.reduction_axis a WHERE a.model_id = p_model_id
$$;

-- The source model of a reduced model, once its fit is done; NULL for a model of its own. Queries
-- under a reduced model are embedded by its source and projected.
CREATE OR REPLACE FUNCTION imgembed._reduction_source(p_model text)
RETURNS imgembed.model
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_model imgembed.model;
    v_reduction record;
    v_source imgembed.model;
BEGIN
    SELECT * INTO v_model FROM imgembed.model m WHERE m.name = p_model;
    IF v_model.derived_from IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT r.status, r.error INTO v_reduction FROM imgembed.reduction r WHERE r.model_id = v_model.id;
    IF v_reduction.status IS DISTINCT FROM 'done' THEN
        RAISE EXCEPTION 'reduced model % is not fitted yet (its fit is %)', p_model, coalesce(v_reduction.status, 'missing')
            USING HINT = coalesce('it failed: ' || v_reduction.error,
                                  'is an imgembed worker running? imgembed.reductions shows the fit'),
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO v_source FROM imgembed.model m WHERE m.id = v_model.derived_from;
    RETURN v_source;
END $$;

-- SQL that writes the projections of the source vectors p_source_rows selects (as e) into a
-- reduced model's vector table ($1: the reduced model's id). A row keeps the projection of the
-- newest source vector: the one with the highest job id.
CREATE OR REPLACE FUNCTION imgembed._write_projections_sql(p_reduced_storage text, p_source_rows text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format(
        'INSERT INTO imgembed.%I AS d (id, embedding, job_id, embedded_at, content_sha256)'
        ' SELECT e.id, imgembed._project($1, e.embedding), e.job_id, e.embedded_at, e.content_sha256 FROM %s'
        ' ON CONFLICT (id) DO UPDATE SET embedding = excluded.embedding, job_id = excluded.job_id,'
        '     embedded_at = excluded.embedded_at, content_sha256 = excluded.content_sha256'
        '  WHERE d.job_id <= excluded.job_id',
        p_reduced_storage, p_source_rows)
$$;

-- Write the projections of every vector the source model holds for a table into the reduced
-- model's vector table (nothing while the model is not fitted), then build its index. Source
-- vectors written meanwhile wait: finish_batch, which projects each new vector, cannot miss the
-- fit and this fill both.
CREATE OR REPLACE FUNCTION imgembed._fill_reduced(p_link imgembed.watch_model)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model;
    v_source_storage text;
    v_written bigint;
BEGIN
    SELECT * INTO v_model FROM imgembed.model m WHERE m.id = p_link.model_id;
    IF NOT EXISTS (SELECT 1 FROM imgembed.reduction r WHERE r.model_id = v_model.id AND r.status = 'done') THEN
        RETURN 0;
    END IF;
    SELECT wm.storage_table INTO v_source_storage FROM imgembed.watch_model wm
     WHERE wm.watch_id = p_link.watch_id AND wm.model_id = v_model.derived_from;
    EXECUTE format('LOCK TABLE imgembed.%I IN SHARE MODE', v_source_storage);
    -- One build of the index after the rows, not one insertion into it per row.
    EXECUTE format('DROP INDEX IF EXISTS imgembed.%I', p_link.storage_table || '_hnsw');
    EXECUTE imgembed._write_projections_sql(p_link.storage_table, format('imgembed.%I e', v_source_storage))
    USING v_model.id;
    GET DIAGNOSTICS v_written = ROW_COUNT;
    PERFORM imgembed._create_index(p_link.storage_table, v_model.dim);
    RETURN v_written;
END $$;

-- Project the vectors a claim just wrote under a source model into the table's fitted reduced
-- models (called by finish_batch, with the jobs it completed).
CREATE OR REPLACE FUNCTION imgembed._project_written(
    p_watch imgembed.watch,
    p_source_link imgembed.watch_model,
    p_job_ids bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_link imgembed.watch_model;
BEGIN
    FOR v_link IN
        SELECT wm.* FROM imgembed.watch_model wm JOIN imgembed.model m ON m.id = wm.model_id
          JOIN imgembed.reduction r ON r.model_id = m.id
         WHERE wm.watch_id = p_watch.id AND m.derived_from = p_source_link.model_id AND r.status = 'done'
         ORDER BY wm.model_id
    LOOP
        EXECUTE imgembed._write_projections_sql(v_link.storage_table, format(
            'imgembed.job j JOIN imgembed.%I e ON e.id = j.key::%s AND e.job_id = j.id WHERE j.id = ANY ($2) AND j.watch_id = $3',
            p_source_link.storage_table, p_watch.key_type))
        USING v_link.model_id, p_job_ids, p_watch.id;
    END LOOP;
END $$;

-- Fewer dimensions for a table's vectors: registers `name` (by default '<model>@pca<dims>'), a
-- model whose vectors are the PCA projections of the table's `model` (its default unless named)
-- onto `dims` dimensions, fitted by a worker on at most `sample_rows` of the table's vectors.
-- Its vectors get their own table and index and follow every row the source model embeds. Search
-- with it by name (model => ...) or make it the table's default (use_model). A reduced model that
-- exists already, attached to another table, is attached with the fit it has. Returns the name.
CREATE OR REPLACE FUNCTION imgembed.reduce(
    tbl regclass,
    model text DEFAULT NULL,
    dims integer DEFAULT 128,
    name text DEFAULT NULL,
    sample_rows integer DEFAULT 100000
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_watch imgembed.watch := imgembed._watch_of(tbl);
    v_source imgembed.model;
    v_name text;
    v_reduced imgembed.model;
BEGIN
    SELECT * INTO v_source FROM imgembed.model m WHERE m.id = (imgembed._watch_model_of(v_watch, reduce.model)).model_id;
    IF v_source.derived_from IS NOT NULL THEN
        RAISE EXCEPTION 'model % is a reduced model already', v_source.name
            USING HINT = format('reduce its source model instead: model => %L', (SELECT m.name FROM imgembed.model m
                                                                                  WHERE m.id = v_source.derived_from)),
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dims IS NULL OR dims < 2 OR dims >= v_source.dim THEN
        RAISE EXCEPTION 'dims must be between 2 and % (model % has % dimensions), got %', v_source.dim - 1,
                        v_source.name, v_source.dim, coalesce(dims::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF sample_rows IS NULL OR sample_rows <= dims THEN
        RAISE EXCEPTION 'sample_rows must be more than dims (%), got %', dims, coalesce(sample_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_name := coalesce(reduce.name, format('%s@pca%s', v_source.name, dims));
    PERFORM pg_advisory_xact_lock(hashtext('imgembed.register_model'));
    SELECT * INTO v_reduced FROM imgembed.model m WHERE m.name = v_name;
    IF FOUND THEN
        IF v_reduced.derived_from IS DISTINCT FROM v_source.id OR v_reduced.dim <> dims THEN
            RAISE EXCEPTION 'model % exists already, and is not a reduction of % to % dimensions', v_name, v_source.name, dims
                USING HINT = 'choose another name => ...', ERRCODE = 'duplicate_object';
        END IF;
    ELSE
        INSERT INTO imgembed.model (name, architecture, pretrained, dim, text_tower, derived_from)
        VALUES (v_name, 'pca', NULL, dims, v_source.text_tower, v_source.id)
        RETURNING * INTO v_reduced;
        INSERT INTO imgembed.reduction (model_id, watch_id, sample_rows) VALUES (v_reduced.id, v_watch.id, sample_rows);
        PERFORM imgembed._notify_jobs(1);
    END IF;
    PERFORM imgembed._attach_model(v_watch, v_reduced, false);
    RETURN v_name;
END $$;

-- A dispatcher takes the oldest pending fit (or one whose worker died): the reduced model's id, or
-- NULL.
CREATE OR REPLACE FUNCTION imgembed.claim_reduction(p_lease_seconds double precision, p_max_attempts integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_model_id integer;
BEGIN
    UPDATE imgembed.reduction
       SET status = 'failed', error = format('worker lost: lease expired %s times', attempts), finished_at = now()
     WHERE status = 'running' AND lease_until < now() AND attempts >= p_max_attempts;
    UPDATE imgembed.reduction r
       SET status = 'running', attempts = r.attempts + 1,
           lease_until = now() + make_interval(secs => p_lease_seconds)
     WHERE r.model_id = (SELECT c.model_id FROM imgembed.reduction c
                          WHERE c.status = 'pending' OR (c.status = 'running' AND c.lease_until < now())
                          ORDER BY c.created_at, c.model_id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING r.model_id INTO v_model_id;
    RETURN v_model_id;
END $$;

-- What a fit asks for: (method, dimensions).
CREATE OR REPLACE FUNCTION imgembed.reduction_spec(p_model_id integer)
RETURNS TABLE (method text, dims integer)
LANGUAGE sql STABLE AS $$
    SELECT r.method, m.dim FROM imgembed.reduction r JOIN imgembed.model m ON m.id = r.model_id
     WHERE r.model_id = p_model_id
$$;

-- The vectors a fit learns from: the source model's vectors of the table it was asked on, at most
-- sample_rows of them, the same ones every time (by a hash of the key).
CREATE OR REPLACE FUNCTION imgembed.reduction_input(p_model_id integer)
RETURNS TABLE (embedding @vector@.vector)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_reduction imgembed.reduction;
    v_storage text;
BEGIN
    SELECT * INTO v_reduction FROM imgembed.reduction r WHERE r.model_id = p_model_id;
    SELECT wm.storage_table INTO v_storage FROM imgembed.model m
      JOIN imgembed.watch_model wm ON wm.watch_id = v_reduction.watch_id AND wm.model_id = m.derived_from
     WHERE m.id = p_model_id;
    IF v_storage IS NULL THEN
        RAISE EXCEPTION 'reduced model % has no vectors to learn from: its table is no longer watched, or its source model was detached from it',
                        (SELECT m.name FROM imgembed.model m WHERE m.id = p_model_id)
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY EXECUTE format('SELECT e.embedding FROM imgembed.%I e ORDER BY md5(e.id::text), e.id LIMIT $1', v_storage)
    USING v_reduction.sample_rows;
END $$;

-- Store a fit (its axes: unit vectors of the source model's space, as pgvector texts) and project
-- every vector of every table the reduced model is attached to.
CREATE OR REPLACE FUNCTION imgembed.finish_reduction(
    p_model_id integer,
    p_axes text[],
    p_fitted_rows integer,
    p_explained_variance double precision
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_model imgembed.model;
    v_link imgembed.watch_model;
BEGIN
    SELECT * INTO v_model FROM imgembed.model m WHERE m.id = p_model_id;
    IF cardinality(p_axes) IS DISTINCT FROM v_model.dim THEN
        RAISE EXCEPTION 'model % has % dimensions: the fit must bring as many axes, not %', v_model.name, v_model.dim,
                        cardinality(p_axes)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM imgembed.reduction_axis WHERE model_id = p_model_id;
    INSERT INTO imgembed.reduction_axis (model_id, axis, direction)
    SELECT p_model_id, a.n - 1, a.v::@vector@.vector FROM unnest(p_axes) WITH ORDINALITY AS a(v, n);
    UPDATE imgembed.reduction
       SET status = 'done', error = NULL, fitted_rows = p_fitted_rows, explained_variance = p_explained_variance,
           finished_at = now(), lease_until = NULL
     WHERE model_id = p_model_id;
    FOR v_link IN SELECT * FROM imgembed.watch_model wm WHERE wm.model_id = p_model_id ORDER BY wm.watch_id LOOP
        PERFORM imgembed._fill_reduced(v_link);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION imgembed.fail_reduction(p_model_id integer, p_error text)
RETURNS void
LANGUAGE sql AS $$
    UPDATE imgembed.reduction SET status = 'failed', error = p_error, finished_at = now(), lease_until = NULL
     WHERE model_id = p_model_id
$$;

-- Reduced models and their fits: the source model, dimensions, the table fitted on, status, how
-- many vectors the fit learnt from and the share of their variance the dimensions keep.
CREATE OR REPLACE VIEW imgembed.reductions AS
SELECT m.name AS model, s.name AS source_model, m.dim AS dims, s.dim AS source_dims, w.table_name AS fitted_on,
       r.status, CASE WHEN w.tbl IS NULL OR NOT row_security_active(w.tbl) THEN r.fitted_rows END AS fitted_rows,
       r.explained_variance, r.error, r.created_at, r.finished_at
  FROM imgembed.reduction r
  JOIN imgembed.model m ON m.id = r.model_id
  JOIN imgembed.model s ON s.id = m.derived_from
  LEFT JOIN imgembed._live_watch w ON w.id = r.watch_id;
