-- Revision 0013, downgrade: back to revision 0012. Who asked for what is forgotten; revision 0012's
-- definitions come back.
DROP TABLE imgembed.query_request;
DROP FUNCTION IF EXISTS imgembed._text_state(text, text, text);
DROP FUNCTION IF EXISTS imgembed._request_text_elsewhere(text, text);
DROP FUNCTION IF EXISTS imgembed._request_text(text, text);
DROP FUNCTION IF EXISTS imgembed._image_state(bytea, text, text, text);
DROP FUNCTION IF EXISTS imgembed._request_image_elsewhere(bytea, text, text);
DROP FUNCTION IF EXISTS imgembed._request_image(bytea, text, text);
DROP FUNCTION IF EXISTS imgembed._may_request_as(text);
DROP FUNCTION IF EXISTS imgembed._record_request(text, bigint, text);
DROP FUNCTION IF EXISTS imgembed._check_requests(text, text, bigint);
DROP FUNCTION IF EXISTS imgembed._query_limits();
DROP FUNCTION IF EXISTS imgembed.forget_queries();
DROP FUNCTION IF EXISTS imgembed._forget_queries(text);
DROP FUNCTION IF EXISTS imgembed.expire_queries(interval);
--@definitions 0012
