-- A hang-up asked of a node that does not run the call: the node that
-- runs it (calls.node_id) picks the request up from here.
ALTER TABLE calls ADD COLUMN hangup_requested_at BIGINT;
