-- Revision 0005, upgrade: settings only the owner reads, and the role that recorded each
-- interaction. Row-level security, the policies and the grants that use them are defined in sql/.
CREATE TABLE imgembed.private_setting (name text PRIMARY KEY, value text NOT NULL);
REVOKE ALL ON imgembed.private_setting FROM PUBLIC;
ALTER TABLE imgembed.interaction ADD COLUMN role_name text NOT NULL DEFAULT current_user;
