-- Revision 0012, upgrade.
-- 1. imgembed.model.derived_from: a reduced model (imgembed.reduce) is derived from another
--    registered model. Workers never embed with it: its vectors are projections of its source's.
-- 2. imgembed.reduction: one fit per reduced model (PCA of a watched table's vectors), requested in
--    SQL and performed by a worker like a clustering run.
-- 3. imgembed.reduction_axis: the fitted projection, one row per output dimension: a unit vector
--    of the source model's space (principal components, and the direction of the mean).
ALTER TABLE imgembed.model ADD COLUMN derived_from integer REFERENCES imgembed.model (id);

CREATE TABLE imgembed.reduction (
    model_id integer PRIMARY KEY REFERENCES imgembed.model (id) ON DELETE CASCADE,
    watch_id integer REFERENCES imgembed.watch (id) ON DELETE SET NULL,
    method text NOT NULL DEFAULT 'pca',
    sample_rows integer NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    lease_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    fitted_rows integer,
    explained_variance double precision,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT reduction_method_known CHECK (method IN ('pca')),
    CONSTRAINT reduction_status_known CHECK (status IN ('pending', 'running', 'done', 'failed')),
    CONSTRAINT reduction_sample_positive CHECK (sample_rows > 0)
);
CREATE INDEX reduction_pending ON imgembed.reduction (model_id) WHERE status = 'pending';

-- pgvector's schema is named, not found by the search path (as in sql/: apply_definition.sql).
DO $$
DECLARE
    v_vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    EXECUTE format('CREATE TABLE imgembed.reduction_axis ('
                   '    model_id integer NOT NULL REFERENCES imgembed.reduction (model_id) ON DELETE CASCADE,'
                   '    axis integer NOT NULL,'
                   '    direction %s.vector NOT NULL,'
                   '    PRIMARY KEY (model_id, axis))', v_vector_schema);
END $$;
-- Every vector a reduced model stores reads all its axes: kept in the row and uncompressed (up to
-- 8 KB, 2,000 dimensions), not compressed, a projection takes half the time.
ALTER TABLE imgembed.reduction_axis ALTER COLUMN direction SET STORAGE EXTERNAL;
ALTER TABLE imgembed.reduction_axis SET (toast_tuple_target = 8160);
