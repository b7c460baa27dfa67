-- Revision 0004, upgrade: a worker's heartbeat carries the models it cannot load now. The new
-- worker_beat (one argument more), the views that show them and requeue_claim are defined in sql/.
ALTER TABLE imgembed.worker_heartbeat ADD COLUMN unavailable jsonb NOT NULL DEFAULT '[]'::jsonb;
DROP FUNCTION IF EXISTS imgembed.worker_beat(text, integer, text, text[], bigint);
