-- Revision 0013, upgrade: who asked for each text and query image (imgembed.query_request). A
-- text or an image is stored once whoever asks; each role that asks gets a row here, refreshed at
-- every ask. The state functions answer a role about its own requests only; limits count a role's
-- own; a role forgets its own (imgembed.forget_queries()); requests expire (imgembed.expire_queries(),
-- which dispatchers run). Texts and images requested before this revision belong to nobody, and
-- go at the first expiry that finds them older than the window.
CREATE TABLE imgembed.query_request (
    kind TEXT NOT NULL CONSTRAINT query_request_kind_known CHECK (kind IN ('text', 'image')),
    query_id BIGINT NOT NULL,
    role_name TEXT NOT NULL,
    requested_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (kind, query_id, role_name)
);
CREATE INDEX query_request_of_role ON imgembed.query_request (role_name, kind, requested_at);
-- Functions whose arguments change: sql/ makes them again, with the requesting role.
DROP FUNCTION IF EXISTS imgembed._text_state(text, text);
DROP FUNCTION IF EXISTS imgembed._request_text_elsewhere(text);
DROP FUNCTION IF EXISTS imgembed._image_state(bytea, text, text);
DROP FUNCTION IF EXISTS imgembed._request_image_elsewhere(bytea, text);
DROP FUNCTION IF EXISTS imgembed._check_waiting(regclass, text);
